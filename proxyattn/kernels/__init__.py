"""Triton GPU kernels of ProxyAttn; `proxyattn.api` dispatches CUDA tensors here when a stage is provided."""

from .attention import block_sparse_attention, block_sparse_attention_with_lse, dense_attention
from .attention import block_sparse_attention_varlen, block_sparse_attention_varlen_with_lse
