"""Triton GPU kernels of ProxyAttn; `proxyattn.api` dispatches CUDA tensors here when a stage is provided."""

from .attention import block_sparse_attention, block_sparse_attention_split, block_sparse_attention_with_lse, dense_attention
from .attention import block_sparse_attention_varlen, block_sparse_attention_varlen_with_lse
from .estimate_scores import proxy_scores, proxy_scores_varlen
from .estimate_budgets import early_dense_groups, head_budgets, head_budgets_varlen
from .estimate_head_max import head_max_scores, head_max_scores_varlen
from .estimate_select import select_blocks, select_blocks_varlen, plan_blocks_varlen, block_needs, needs_plan, VARLEN_SCORES
