"""ProxyAttn: training-free sparse attention for long-context prefill.

Heads of a group agree on which key blocks matter and differ mainly in how many: one pooled proxy head
ranks the blocks, every head gets its own budget from its last query block, and block-sparse attention
runs on the kept blocks.
"""

from . import api, metrics, reference
from .api import *  # noqa: F403 - the public stage functions, listed once in api.__all__
from .config import BudgetRule, Estimator, ProxyAttnConfig
from .plan import BlockPlan

__all__ = ["ProxyAttnConfig", "BudgetRule", "Estimator", "BlockPlan", *api.__all__, "metrics", "reference"]

__version__ = "0.1.0"
