"""The block plan: which key blocks every (head, query block) keeps, in the compact form the kernels read.

Compact form. Heads of one proxy group share one ranking of key blocks per query block and differ only in
how many of them they keep, so a plan stores

* `order  [B, R, Nb, Nb]` int32: for ranking r and query block m, the key blocks 0..m in the order they are
  kept (forced blocks, i.e. sink and diagonal, first; then descending proxy score, ties to the lower index);
  entries past m are unused;
* `counts [B, Hq, Nb]` int32: head h keeps the first counts[b, h, m] entries of order[b, h // (Hq / R), m].

This is R / Hq of the size of per-head index lists (R = proxy_heads, usually 1) and lets heads that share a
KV head walk the same list. `BlockPlan.from_mask` builds a plan from any block mask (then R = Hq).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import reference
from .config import ProxyAttnConfig


@dataclass(frozen=True)
class BlockPlan:
    """Kept key blocks of every (batch, query head, query block).

    Attributes:
        order: int32 `[B, R, Nb, Nb]`, key blocks of query block m in keep order (entries past m unused).
        counts: int32 `[B, Hq, Nb]`, how many leading entries of its ranking row each head keeps (1..m+1).
        budget_blocks: int32 `[B, Hq]`, each head's budget n_h in key blocks; the budget fraction is n_h / Nb.
        block_size: tokens per block.
        seq_len: S, the number of tokens the plan covers.
        dense_heads: bool `[B, Hq]` or None: heads that run dense (the dense fallback,
            `ProxyAttnConfig.dense_density`); their counts cover every causal block, so the plan's mask and
            density are what runs. None: no head does.
        columns: int32 `[B, G, C]` or None: vertical columns (`ProxyAttnConfig.column_fraction`), key tokens that
            query head h attends besides its kept blocks (row h // (Hq / G), ascending); a column inside a kept
            block counts once. None: blocks only.
    """

    order: torch.Tensor
    counts: torch.Tensor
    budget_blocks: torch.Tensor
    block_size: int
    seq_len: int
    dense_heads: torch.Tensor | None = None
    columns: torch.Tensor | None = None

    def __post_init__(self) -> None:
        nb = self.num_blocks
        assert self.order.dim() == 4 and self.order.shape[-2:] == (nb, nb), (self.order.shape, nb)
        assert self.counts.dim() == 3 and self.counts.shape[-1] == nb, (self.counts.shape, nb)
        assert self.counts.shape[1] % self.order.shape[1] == 0, (self.counts.shape, self.order.shape)
        assert self.budget_blocks.shape == self.counts.shape[:2], (self.budget_blocks.shape, self.counts.shape)
        assert self.order.dtype == torch.int32 and self.counts.dtype == torch.int32
        assert self.dense_heads is None or (self.dense_heads.dtype == torch.bool and self.dense_heads.shape == self.counts.shape[:2])
        if self.columns is not None:
            c = self.columns
            assert c.dtype == torch.int32 and c.dim() == 3 and c.shape[0] == self.counts.shape[0], c.shape
            assert self.counts.shape[1] % c.shape[1] == 0 and 0 < c.shape[2] <= self.seq_len, (c.shape, self.counts.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def num_heads(self) -> int:
        return self.counts.shape[1]

    @property
    def budgets(self) -> torch.Tensor:
        """Budget fraction b_h `[B, Hq]` float32 (budget blocks over Nb)."""
        return self.budget_blocks.float() / self.num_blocks

    def density(self) -> torch.Tensor:
        """Kept blocks over causal blocks, per head: `[B, Hq]` float32."""
        nb = self.num_blocks
        return self.counts.sum(dim=-1).float() / (nb * (nb + 1) / 2)

    def column_density(self) -> torch.Tensor:
        """The columns' share of the work, per head: `[B, Hq]` float32, 0 without columns. Query block m of a head
        reads the columns at or before its last row (`column_counts`) as a block_size-row strip each, unless it
        keeps every causal block (a full row, e.g. a dense head: nothing to add); their area over the causal
        block area. `work_density()` adds it to `density()`."""
        b, hq, nb = self.counts.shape
        if self.columns is None:
            return torch.zeros(b, hq, device=self.counts.device)
        per_head = self.column_counts().repeat_interleave(hq // self.columns.shape[1], dim=1)  # [B, Hq, Nb]
        full = self.counts >= torch.arange(1, nb + 1, device=self.counts.device, dtype=self.counts.dtype)
        strips = per_head.masked_fill(full, 0).sum(dim=-1).float() / self.block_size  # in blocks
        return strips / (nb * (nb + 1) / 2)

    def work_density(self) -> torch.Tensor:
        """The plan's total work over the causal area, per head: `[B, Hq]` float32, kept blocks (`density`) plus
        columns (`column_density`); equal to `density()` without columns."""
        return self.density() + self.column_density()

    def column_counts(self) -> torch.Tensor:
        """int32 `[B, G, Nb]`: columns at or before the last row of each query block (what it reads; ascending columns)."""
        assert self.columns is not None
        b, g, _ = self.columns.shape
        ends = (torch.arange(1, self.num_blocks + 1, device=self.columns.device) * self.block_size - 1).clamp(max=self.seq_len - 1)
        return torch.searchsorted(self.columns, ends.to(torch.int32).expand(b, g, -1).contiguous(), right=True).to(torch.int32)

    def head_orders(self) -> torch.Tensor:
        """The ranking each head reads: `[B, Hq, Nb, Nb]` (a view when R = Hq, else an expanded copy)."""
        rep = self.num_heads // self.order.shape[1]
        return self.order if rep == 1 else self.order.repeat_interleave(rep, dim=1)

    def to_mask(self) -> torch.Tensor:
        """Dense bool block mask `[B, Hq, Nb, Nb]`: True where (query block m, key block n) is kept."""
        nb = self.num_blocks
        order = self.head_orders().long()
        keep = torch.arange(nb, device=order.device) < self.counts.unsqueeze(-1)  # [B, Hq, Nb, Nb] over positions
        mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
        return mask.scatter(-1, order, keep)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, *, block_size: int, seq_len: int) -> "BlockPlan":
        """Plan from a bool block mask `[B, Hq, Nb, Nb]` (entries above the diagonal are ignored).

        Kept blocks come first in ascending index order. Budgets are set to the kept blocks of the last row.
        """
        nb = -(-seq_len // block_size)
        if mask.dim() != 4 or mask.shape[-2:] != (nb, nb):
            raise ValueError(f"mask shape {tuple(mask.shape)} must be [B, Hq, {nb}, {nb}] for seq_len={seq_len}")
        causal = torch.ones(nb, nb, dtype=torch.bool, device=mask.device).tril()
        kept = mask.bool() & causal
        # Sort key: kept blocks first, then by index.
        key = (~kept).to(torch.int64) * nb + torch.arange(nb, device=mask.device)
        order = key.argsort(dim=-1).to(torch.int32)
        counts = kept.sum(dim=-1).to(torch.int32)
        return cls(order.contiguous(), counts.contiguous(), counts[..., -1].contiguous(), block_size, seq_len)


def dense_fallback(
    plan: BlockPlan, num_kv_heads: int, config: ProxyAttnConfig, nb_seq: torch.Tensor | None = None, early: torch.Tensor | None = None
) -> BlockPlan:
    """The plan with the dense fallback applied: KV groups keeping at least config.dense_density of their causal
    blocks (`reference.dense_groups`), and those of `early` (bool `[B, Hkv]`, `reference.early_dense_groups`),
    keep every causal block and are marked in `dense_heads`. nb_seq: int `[B]` blocks of each packed sequence
    (default Nb). Device ops, no synchronisation."""
    permille = config.dense_density_permille
    if permille == 0:
        return plan
    groups = reference.dense_groups(plan.counts, num_kv_heads, permille, nb_seq)
    if early is not None:
        groups = groups | early
    counts, heads = reference.apply_dense_groups(plan.counts, groups, nb_seq)
    return dataclasses.replace(plan, counts=counts, dense_heads=heads)


def compact_plan(scores: torch.Tensor, budget_blocks: torch.Tensor, seq_len: int, config: ProxyAttnConfig) -> BlockPlan:
    """Vectorised selection into the compact form (equals `reference.select_blocks`, tested against it).

    scores `[B, R, Nb, Nb]` float, budget_blocks `[B, Hq]` int32.
    """
    k = reference.block_counts(budget_blocks, scores.shape[-1], config.min_budget_blocks)  # [B, Hq, Nb]
    return compact_plan_top_k(scores, k, budget_blocks, seq_len, config)


def compact_plan_needs(
    scores: torch.Tensor, needs: torch.Tensor, budget_blocks: torch.Tensor, seq_len: int, config: ProxyAttnConfig
) -> BlockPlan:
    """Selection of budget_rule "block_recall": top-k min_blocks per (head, query block), and every row keeps at least the
    first needs[b, h, m] blocks of its order (`reference.block_needs`; equals `reference.select_blocks` with
    needs). needs `[B, Hq, Nb]` int; budget_blocks `[B, Hq]` is only stored in the plan."""
    b, hq, nb = needs.shape
    m1 = torch.arange(1, nb + 1, device=needs.device, dtype=torch.int32)
    top_k = torch.minimum(m1, torch.full_like(m1, config.min_budget_blocks)).expand(b, hq, nb)
    plan = compact_plan_top_k(scores, top_k, budget_blocks, seq_len, config)
    counts = torch.maximum(plan.counts, torch.minimum(needs.to(torch.int32), m1))
    return BlockPlan(plan.order, counts.contiguous(), plan.budget_blocks, plan.block_size, plan.seq_len)


def compact_plan_top_k(
    scores: torch.Tensor, top_k: torch.Tensor, budget_blocks: torch.Tensor, seq_len: int, config: ProxyAttnConfig
) -> BlockPlan:
    """`compact_plan` with the top-k size of every (head, query block) given, `top_k` `[B, Hq, Nb]`, instead of
    derived from the budgets by `block_counts` (budget_blocks is only stored in the plan)."""
    b, r, nb, _ = scores.shape
    hq = top_k.shape[1]
    dev = scores.device
    causal = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()
    s = scores.float().masked_fill(~causal, float("-inf"))
    ranked = torch.sort(s, dim=-1, descending=True, stable=True).indices  # ties: lower index first
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(nb, device=dev).expand_as(ranked))
    forced = torch.zeros(nb, nb, dtype=torch.bool, device=dev)
    if config.keep_sink:
        forced[:, 0] = True
    if config.keep_diagonal:
        forced.fill_diagonal_(True)
    forced &= causal
    order = (rank + (~forced).to(rank.dtype) * nb).argsort(dim=-1).to(torch.int32)

    k = top_k
    rep = hq // r
    extra = torch.zeros_like(k)
    if config.keep_sink:
        sink_rank = rank[..., :, 0].repeat_interleave(rep, dim=1)  # [B, Hq, Nb]
        extra += (sink_rank >= k).to(extra.dtype)
    if config.keep_diagonal:
        diag_rank = rank.diagonal(dim1=-2, dim2=-1).repeat_interleave(rep, dim=1)
        diag_extra = diag_rank >= k
        if config.keep_sink:
            diag_extra[..., 0] = False  # block 0 is both sink and diagonal in row 0
        extra += diag_extra.to(extra.dtype)
    counts = (k + extra).to(torch.int32)
    return BlockPlan(order.contiguous(), counts.contiguous(), budget_blocks.to(torch.int32).contiguous(), config.block_size, seq_len)
