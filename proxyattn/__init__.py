"""ProxyAttn: training-free sparse attention for long-context prefill.

Heads of a group agree on which key blocks matter and differ mainly in how many: one pooled proxy head
ranks the blocks, every head gets its own budget from its last query block, and block-sparse attention
runs on the kept blocks.
"""

from . import metrics, reference
from .api import (
    block_sparse_attention,
    block_sparse_attention_varlen,
    block_sparse_attention_varlen_with_lse,
    block_sparse_attention_with_lse,
    dense_attention,
    head_budgets,
    block_needs,
    plan_blocks,
    early_dense_groups,
    plan_blocks_varlen,
    proxy_attention,
    proxy_attention_varlen,
    proxy_scores,
    select_blocks,
)
from .config import BudgetRule, Estimator, ProxyAttnConfig
from .plan import BlockPlan

__all__ = [
    "ProxyAttnConfig",
    "BudgetRule",
    "Estimator",
    "BlockPlan",
    "proxy_scores",
    "head_budgets",
    "block_needs",
    "select_blocks",
    "plan_blocks",
    "early_dense_groups",
    "dense_attention",
    "block_sparse_attention",
    "block_sparse_attention_with_lse",
    "proxy_attention",
    "plan_blocks_varlen",
    "block_sparse_attention_varlen",
    "block_sparse_attention_varlen_with_lse",
    "proxy_attention_varlen",
    "metrics",
    "reference",
]

__version__ = "0.1.0"
