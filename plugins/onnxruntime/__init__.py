"""ONNX Runtime custom op for `proxy::ProxyAttention` (the real ProxyAttn algorithm on the CPU); see `custom_op`."""

from .custom_op import CONTRIB_DOMAIN, make_session, register_op, to_custom_op_model

__all__ = ["CONTRIB_DOMAIN", "make_session", "register_op", "to_custom_op_model"]
