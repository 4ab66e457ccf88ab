"""Runtime back ends for the `proxy::ProxyAttention` node: `plugins.onnxruntime` (CPU custom op) and `plugins.tensorrt`."""
