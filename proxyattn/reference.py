"""Plain fp32 PyTorch reference of every ProxyAttn stage, written to be obviously right.

Shapes: q `[B, S, Hq, D]`, k and v `[B, S, Hkv, D]`, Hq a multiple of Hkv; Nb = ceil(S / block_size).
Every function upcasts to float32 and works on any device. None of them is fast; the kernels in
`proxyattn.kernels` compute the same functions on the GPU and are tested against these.
"""

from __future__ import annotations

import math

import torch

from .config import BudgetRule

__all__ = [
    "dense_attention",
    "proxy_queries_keys",
    "proxy_scores",
    "last_block_mass",
    "last_block_row_mass",
    "last_row_order",
    "head_budgets",
    "rule_budgets",
    "recall_row_positions",
    "block_needs",
    "needs_budgets",
    "block_counts",
    "select_blocks",
    "block_sparse_attention",
    "proxy_columns",
    "column_rows",
]


def _num_blocks(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, S, Hq, D]: query head h reads KV head h // (Hq / Hkv)."""
    return x.repeat_interleave(num_q_heads // x.shape[2], dim=2)


def _masked_attention(q, k, v, allowed_rows, scale, chunk: int = 1024):
    """Softmax attention where `allowed_rows(lo, hi)` gives the bool mask `[B or 1, Hq or 1, hi-lo, S]`
    (True = attend) of query rows lo..hi-1. Processed in chunks of query rows to bound memory.

    Returns (out [B, S, Hq, D] fp32, lse [B, Hq, S] fp32). Rows with no allowed key give 0 and lse -inf.
    """
    q, k, v = (t.float() for t in (q, k, v))
    b, s, hq, d = q.shape
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    out = torch.empty(b, s, hq, v.shape[-1], device=q.device)
    lse = torch.empty(b, hq, s, device=q.device)
    for lo in range(0, s, chunk):
        hi = min(s, lo + chunk)
        allowed = allowed_rows(lo, hi)
        logits = torch.einsum("bqhd,bkhd->bhqk", q[:, lo:hi], k) * scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - row_lse.unsqueeze(-1).masked_fill(torch.isinf(row_lse).unsqueeze(-1), 0.0))
        probs = probs.masked_fill(~allowed, 0.0)
        out[:, lo:hi] = torch.einsum("bhqk,bkhd->bqhd", probs, v)
        lse[:, :, lo:hi] = row_lse
    return out, lse


def _causal_rows(lo: int, hi: int, seq_len: int, device) -> torch.Tensor:
    """[hi-lo, S] bool: key j visible from query row i (j <= i)."""
    return torch.arange(seq_len, device=device)[None, :] <= torch.arange(lo, hi, device=device)[:, None]


def dense_attention(q, k, v, scale: float) -> torch.Tensor:
    """Exact causal attention, fp32. Returns [B, S, Hq, D]."""
    s = q.shape[1]
    return _masked_attention(q, k, v, lambda lo, hi: _causal_rows(lo, hi, s, q.device)[None, None], scale)[0]


def proxy_queries_keys(q, k, proxy_heads: int):
    """Pooled proxy heads: q `[B,Sq,Hq,D]`, k `[B,S,Hkv,D]` -> (pq `[B,Sq,G,D]`, pk `[B,S,G,D]`), fp32.

    The KV heads are split into G = proxy_heads contiguous groups; a group's proxy query is the mean of all
    query heads that read its KV heads, its proxy key the mean of its KV heads. q may hold only some query rows
    (Sq <= S).
    """
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    pq = q.float().reshape(b, sq, proxy_heads, hq // proxy_heads, d).mean(dim=3)
    pk = k.float().reshape(b, k.shape[1], proxy_heads, hkv // proxy_heads, d).mean(dim=3)
    return pq, pk


def proxy_scores(
    q, k, *, proxy_heads: int, block_size: int, stride: int, scale: float, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Proxy block scores `[B, G, Nb, Nb]` fp32.

    For query rows 0, stride, 2*stride, ... the causal softmax of the proxy query against all keys; then
    score[m, n] = max of those probabilities over strided rows in query block m and keys in key block n.
    Blocks above the diagonal (n > m) hold -inf. exclude: bool `[B, G, S]` or None, keys left out of the max (the
    proxy head's vertical columns, attended anyway; the softmax still runs over every key): a block whose keys are
    all excluded scores 0.
    """
    b, s, _, _ = q.shape
    nb = _num_blocks(s, block_size)
    pq, pk = proxy_queries_keys(q, k, proxy_heads)
    scores = torch.full((b, proxy_heads, nb, nb), float("-inf"), device=q.device)
    for m in range(nb):
        hi = min(s, (m + 1) * block_size)  # keys past the block's last row are never visible
        rows = torch.arange(m * block_size, hi, stride, device=q.device)
        logits = torch.einsum("brgd,bkgd->bgrk", pq[:, rows], pk[:, :hi]) * scale
        logits = logits.masked_fill(~_causal_rows(0, hi, hi, q.device)[rows], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [B, G, rows, hi]
        if exclude is not None:
            probs = probs.masked_fill(exclude[:, :, None, :hi], 0.0)
        probs = torch.nn.functional.pad(probs, (0, (m + 1) * block_size - hi))
        scores[:, :, m, : m + 1] = probs.reshape(b, proxy_heads, len(rows), m + 1, block_size).amax(dim=(2, 4))
    return scores


def last_block_row_mass(q, k, *, block_size: int, scale: float) -> torch.Tensor:
    """Attention mass per key block of every row of each head's last query block: `[B, Hq, rows, Nb]` fp32,
    rows = min(block_size, S), each row sums to 1.

    Softmax of the head's last `block_size` queries against all keys (causal), summed per key block.
    """
    b, s, hq, _ = q.shape
    nb = _num_blocks(s, block_size)
    last = min(block_size, s)
    rows = torch.arange(s - last, s, device=q.device)
    kx = _expand_kv(k.float(), hq)
    logits = torch.einsum("brhd,bkhd->bhrk", q.float()[:, rows], kx) * scale
    keys = torch.arange(s, device=q.device)
    logits = logits.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, Hq, rows, S]
    return torch.nn.functional.pad(probs, (0, nb * block_size - s)).reshape(b, hq, last, nb, block_size).sum(-1)


def last_block_mass(q, k, *, block_size: int, scale: float) -> torch.Tensor:
    """Attention mass per key block of each head's last query block: `[B, Hq, Nb]` fp32, rows sum to 1.

    The mean over the last block's rows of `last_block_row_mass`.
    """
    return last_block_row_mass(q, k, block_size=block_size, scale=scale).mean(dim=2)


def last_row_order(scores: torch.Tensor, *, keep_sink: bool, keep_diagonal: bool) -> torch.Tensor:
    """Keep order of the last query block's key blocks, int64 `[B, R, Nb]`: forced blocks (sink, diagonal)
    first in score order, then the rest by descending score, ties to the lower index (as `select_blocks`)."""
    b, r, nb, _ = scores.shape
    out = torch.empty(b, r, nb, dtype=torch.int64)
    row = scores[:, :, nb - 1].float().cpu()
    forced = {n for n, keep in ((0, keep_sink), (nb - 1, keep_diagonal)) if keep}
    for bi in range(b):
        for g in range(r):

            def rank(n: int) -> tuple[float, int]:
                return (-row[bi, g, n].item(), n)

            ranked = sorted(forced, key=rank) + sorted(set(range(nb)) - forced, key=rank)
            out[bi, g] = torch.tensor(ranked)
    return out.to(scores.device)


def head_budgets(
    q, k, *, block_size: int, gamma: float, scale: float, last_order: torch.Tensor | None = None, per_row: bool = False
) -> torch.Tensor:
    """Per-head budgets as a number of key blocks `[B, Hq]` int32 (the fraction is that over Nb).

    Rule "mass" (the paper; last_order None): the smallest number of blocks whose cumulative mass, sorted
    descending, reaches gamma. Rule "recall" (last_order `[B, R, Nb]` given, see `last_row_order`): the smallest
    prefix of the shared ranking of the last query block (head h reads ranking h // (Hq / R)) whose blocks hold
    gamma of the head's own mass -- a head whose attention the shared ranking misses gets a larger budget.
    Mass = `last_block_mass`. Rule "row_recall" (last_order given, per_row True): the smallest prefix of that
    ranking holding gamma of the mass of every row of the head's last query block (`last_block_row_mass`), so
    no query row of that block keeps less than gamma of its attention; never below rule "recall".
    gamma = 1 keeps every block.
    """
    b, s, hq, _ = q.shape
    nb = _num_blocks(s, block_size)
    if gamma >= 1.0:
        return torch.full((b, hq), nb, dtype=torch.int32, device=q.device)
    if per_row:
        assert last_order is not None, "rule row_recall needs the last row's ranking"
        mass = last_block_row_mass(q, k, block_size=block_size, scale=scale)  # [B, Hq, rows, Nb]
    else:
        mass = last_block_mass(q, k, block_size=block_size, scale=scale)  # [B, Hq, Nb]
    if last_order is None:
        ordered = mass.sort(dim=-1, descending=True).values
    else:
        order = last_order.repeat_interleave(hq // last_order.shape[1], dim=1).long()
        ordered = mass.gather(-1, order.unsqueeze(2).expand_as(mass) if per_row else order)
    needed = (ordered.cumsum(dim=-1) < gamma).sum(dim=-1) + 1
    if per_row:
        needed = needed.amax(dim=-1)
    return needed.clamp(max=nb).to(torch.int32)


def recall_row_positions(m: int, seq_len: int, block_size: int, rows: int) -> list[int]:
    """Query rows of block m that the "block_recall" rule measures: the block's last row and every (block_size / rows)-th
    row before it, inside the block (a short last block has fewer)."""
    lo, hi = m * block_size, min(seq_len, (m + 1) * block_size)
    step = block_size // rows
    return [t for t in (hi - 1 - i * step for i in range(rows)) if t >= lo]


def block_needs(
    q,
    k,
    scores,
    *,
    block_size: int,
    gamma: float,
    scale: float,
    rows: int,
    keep_sink: bool,
    keep_diagonal: bool,
    last_only: bool = False,
    skip_groups: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Budget rule "block_recall": per (head, query block) the shortest prefix of that block's ranking that
    holds gamma of the attention mass of each measured row, int32 `[B, Hq, Nb]`.

    For query block m the ranking is row m of `scores` `[B, R, Nb, Nb]` (head h reads row h // (Hq / R)), forced
    blocks first (`last_row_order` of the scores cut at m); the measured rows are `recall_row_positions`; each
    row's softmax (causal) is summed per key block, accumulated along the ranking, and the row needs the fewest
    blocks reaching gamma (all m + 1 when rounding keeps it below). The need is the largest over the rows.
    gamma = 1 needs every causal block. `last_only`: only the last query block (the other entries are 0).
    `skip_groups` bool `[B, Hkv]` (`early_dense_groups`): the heads of these KV groups are not measured and need
    every causal block (m + 1).
    `columns` int `[B, G, C]` (vertical columns, `proxy_columns`; head h reads row h // (Hq / G)): the head attends
    to these keys besides its blocks, so a row's mass on them counts as held before any block and a block holds only
    the mass of its other keys (a column inside a kept block counts once).
    """
    b, s, hq, _ = q.shape
    nb = _num_blocks(s, block_size)
    out = torch.zeros(b, hq, nb, dtype=torch.int32, device=q.device)
    column_keys = None if columns is None else column_rows(columns.to(q.device), hq, s)
    skip = None
    if skip_groups is not None:
        skip = skip_groups.to(q.device).repeat_interleave(hq // skip_groups.shape[1], dim=1)  # [B, Hq]
    for m in range(nb - 1 if last_only else 0, nb):
        if gamma >= 1.0:
            out[..., m] = m + 1
            continue
        cum = recall_row_cum_mass(
            q,
            k,
            scores,
            m,
            block_size=block_size,
            scale=scale,
            rows=rows,
            keep_sink=keep_sink,
            keep_diagonal=keep_diagonal,
            column_keys=column_keys,
        )
        out[..., m] = ((cum < gamma).sum(-1) + 1).clamp(max=m + 1).amax(-1).to(torch.int32)
        if skip is not None:
            out[..., m] = torch.where(skip, m + 1, out[..., m])
    return out


# ------------------------------------------------------------------------------------------- dense fallback
# A KV group (the query heads sharing one KV head) runs dense when its plan keeps at least dense_density of its
# causal blocks (ProxyAttnConfig.dense_density, compared in thousandths: `permille`, so that every backend decides
# with the same integer arithmetic), or, decided before any proxy score, when its heads' budgets of the paper's rule
# on the last query block already reach that share (`early_dense_groups`); block_recall does not measure those.


def full_counts(nb: int, nb_seq: torch.Tensor) -> torch.Tensor:
    """Counts of the full causal plan, int32 `[B, 1, Nb]`: m + 1 for query blocks inside each sequence, else 0.
    nb_seq: int `[B]`, blocks of each sequence."""
    m1 = torch.arange(1, nb + 1, device=nb_seq.device, dtype=torch.int64)
    return torch.where(m1 <= nb_seq.to(torch.int64).reshape(-1, 1, 1), m1, 0).to(torch.int32)


def dense_groups(counts: torch.Tensor, num_kv_heads: int, permille: int, nb_seq: torch.Tensor | None = None) -> torch.Tensor:
    """bool `[B, Hkv]`: KV groups whose plan keeps at least permille / 1000 of their causal blocks (permille 0:
    none). counts int `[B, Hq, Nb]`; nb_seq int `[B]` (default Nb). Device ops, no synchronisation."""
    b, hq, nb = counts.shape
    group = hq // num_kv_heads
    if nb_seq is None:
        nb_seq = torch.full((b,), nb, device=counts.device, dtype=torch.int64)
    nbs = nb_seq.to(torch.int64).reshape(-1, 1)
    kept = counts.to(torch.int64).reshape(b, num_kv_heads, group * nb).sum(-1)
    causal = group * nbs * (nbs + 1) // 2
    return (kept * 1000 >= permille * causal) & (causal > 0) & (permille > 0)


def early_dense_groups(budgets: torch.Tensor, num_kv_heads: int, permille: int, nb_seq: torch.Tensor) -> torch.Tensor:
    """bool `[B, Hkv]`: KV groups whose heads' budgets of the paper's rule on their last query block (int `[B, Hq]`,
    `head_budgets` with rule "mass": the fewest blocks holding gamma of the block's mean attention mass, in the
    head's own order, so no ranking needs fewer) sum to at least permille / 1000 of group x Nb_b blocks. Decided
    before the proxy scores: these groups run dense, and block_recall does not measure them."""
    b, hq = budgets.shape
    group = hq // num_kv_heads
    nbs = nb_seq.to(torch.int64).reshape(-1, 1)
    total = budgets.to(torch.int64).reshape(b, num_kv_heads, group).sum(-1)
    return (total * 1000 >= permille * group * nbs) & (nbs > 0) & (permille > 0)


def apply_dense_groups(counts: torch.Tensor, groups: torch.Tensor, nb_seq: torch.Tensor | None = None):
    """(counts with every causal block for the heads of `groups`, dense_heads bool `[B, Hq]`)."""
    b, hq, nb = counts.shape
    if nb_seq is None:
        nb_seq = torch.full((b,), nb, device=counts.device, dtype=torch.int64)
    heads = groups.repeat_interleave(hq // groups.shape[1], dim=1)
    full = full_counts(nb, nb_seq).expand_as(counts)
    return torch.where(heads[..., None], full, counts).contiguous(), heads


def needs_budgets(needs: torch.Tensor, min_blocks: int, nb_seq: torch.Tensor | None = None) -> torch.Tensor:
    """Budget rule block_recall's reported budget, int32 `[B, Hq]`: the need of each sequence's last query block, at least
    min(min_blocks, Nb_b). needs `[B, Hq, Nb]`; nb_seq: int64 `[B]` blocks of each packed sequence (default Nb).
    Device ops only (no host synchronisation)."""
    b, hq, nb = needs.shape
    if nb_seq is None:
        nb_seq = torch.full((b,), nb, device=needs.device, dtype=torch.int64)
    last = needs.gather(-1, (nb_seq.clamp_min(1) - 1).reshape(-1, 1, 1).expand(-1, hq, 1)).squeeze(-1)
    return torch.maximum(last.to(torch.int64), nb_seq.clamp(max=min_blocks).reshape(-1, 1)).to(torch.int32)


def recall_row_cum_mass(
    q,
    k,
    scores,
    m: int,
    *,
    block_size: int,
    scale: float,
    rows: int,
    keep_sink: bool,
    keep_diagonal: bool,
    column_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cumulative attention mass of query block m's measured rows along the block's ranking: `[B, Hq, rows_m,
    m+1]` fp32 (`block_needs`). Each measured row's softmax (causal) is summed per key block; the blocks are
    taken in the order of row m of `scores` (`last_row_order` of the scores cut at m, head h reads row
    h // (Hq / R)). column_keys bool `[B, Hq, S]` (`column_rows`): the row's mass on them starts the sum and the
    blocks hold only their other keys."""
    b, s, hq, _ = q.shape
    pos = torch.tensor(recall_row_positions(m, s, block_size, rows), device=q.device)
    hi = (m + 1) * block_size
    kx = _expand_kv(k.float()[:, : min(s, hi)], hq)
    logits = torch.einsum("brhd,bkhd->bhrk", q.float()[:, pos], kx) * scale
    keys = torch.arange(min(s, hi), device=q.device)
    logits = logits.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
    probs = torch.nn.functional.pad(torch.softmax(logits, dim=-1), (0, hi - min(s, hi)))
    held = None
    if column_keys is not None:
        col = torch.nn.functional.pad(column_keys[..., : min(s, hi)], (0, hi - min(s, hi)))[:, :, None, :]
        held = (probs * col).sum(-1, keepdim=True)  # [B, Hq, rows, 1]
        probs = probs.masked_fill(col, 0.0)
    mass = probs.reshape(b, hq, len(pos), m + 1, block_size).sum(-1)  # [B, Hq, rows, m+1]
    order = last_row_order(scores[:, :, : m + 1, : m + 1], keep_sink=keep_sink, keep_diagonal=keep_diagonal)
    order = order.to(q.device).repeat_interleave(hq // scores.shape[1], dim=1)[:, :, None, :].expand_as(mass)
    cum = mass.gather(-1, order).cumsum(-1)
    return cum if held is None else held + cum


def rule_budgets(
    q, k, scores, *, block_size: int, gamma: float, scale: float, budget_rule: BudgetRule | int | str, keep_sink: bool, keep_diagonal: bool
) -> torch.Tensor:
    """`head_budgets` under `budget_rule` (a `BudgetRule`, its name or number): mass; recall and row_recall read the
    last row of `scores` `[B, R, Nb, Nb]`."""
    rule = BudgetRule.parse(budget_rule, "budget_rule")
    assert not rule.per_query_block, "block_recall counts per query block: block_needs"
    last_order = None
    if rule.reads_ranking and gamma < 1.0:
        last_order = last_row_order(scores, keep_sink=keep_sink, keep_diagonal=keep_diagonal)
    return head_budgets(q, k, block_size=block_size, gamma=gamma, scale=scale, last_order=last_order, per_row=rule.per_row)


def fraction_budgets(batch: int, num_q_heads: int, num_blocks: int, fraction: float, device) -> torch.Tensor:
    """Static budget: every head keeps ceil(fraction * Nb) blocks (computed on the host in float64)."""
    n = min(num_blocks, max(1, math.ceil(fraction * num_blocks)))
    return torch.full((batch, num_q_heads), n, dtype=torch.int32, device=device)


def block_counts(budget_blocks: torch.Tensor, num_blocks: int, min_blocks: int) -> torch.Tensor:
    """Top-k size per query block: k[b, h, m] = clamp(ceil(n_h (m+1) / Nb), min_blocks, m+1), int32 `[B, Hq, Nb]`.

    Integer arithmetic only, so every backend computes the same numbers.
    """
    m1 = torch.arange(1, num_blocks + 1, device=budget_blocks.device, dtype=torch.int64)
    n = budget_blocks.to(torch.int64).unsqueeze(-1)
    k = (n * m1 + num_blocks - 1) // num_blocks
    k = torch.maximum(k, torch.full_like(k, min_blocks))
    return torch.minimum(k, m1.expand_as(k)).to(torch.int32)


def select_blocks(
    scores, budget_blocks, *, min_blocks: int, keep_sink: bool, keep_diagonal: bool, needs: torch.Tensor | None = None
) -> torch.Tensor:
    """Brute-force selection: bool mask `[B, Hq, Nb, Nb]`.

    scores `[B, G, Nb, Nb]` (head h uses proxy row h // (Hq / G)), budget_blocks `[B, Hq]`. For head h and query
    block m keep the k (see `block_counts`) causal key blocks with the highest scores in row m (ties: lower block
    index first), plus block 0 and block m when keep_sink / keep_diagonal. With `needs` `[B, Hq, Nb]` (budget_rule
    "block_recall", `block_needs`) k is min_blocks instead, and row m also keeps the first needs[m] blocks of its ranking
    (forced blocks first, `last_row_order` of the scores cut at m).
    """
    b, g, nb, _ = scores.shape
    hq = budget_blocks.shape[1]
    if needs is None:
        counts = block_counts(budget_blocks, nb, min_blocks).cpu()
    else:
        counts = torch.minimum(torch.full((b, hq, nb), min_blocks), torch.arange(1, nb + 1))
    sc = scores.float().cpu()
    mask = torch.zeros(b, hq, nb, nb, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            row_scores = sc[bi, h // (hq // g)]
            for m in range(nb):
                ranked = sorted(range(m + 1), key=lambda n: (-row_scores[m, n].item(), n))
                for n in ranked[: int(counts[bi, h, m])]:
                    mask[bi, h, m, n] = True
                if keep_sink:
                    mask[bi, h, m, 0] = True
                if keep_diagonal:
                    mask[bi, h, m, m] = True
    if needs is not None:
        for m in range(nb):
            order = last_row_order(scores[:, :, : m + 1, : m + 1], keep_sink=keep_sink, keep_diagonal=keep_diagonal)
            for bi in range(b):
                for h in range(hq):
                    mask[bi, h, m, order[bi, h // (hq // g), : int(needs[bi, h, m])]] = True
    return mask.to(scores.device)


def block_sparse_attention(q, k, v, block_mask, *, block_size: int, scale: float, columns: torch.Tensor | None = None):
    """Exact causal attention restricted to kept blocks and, when given, to vertical columns.

    block_mask `[B, Hq, Nb, Nb]` bool; columns int `[B, G, C]` or None: key token indices that query head h attends
    besides its kept blocks (row h // (Hq / G); each seen by the queries at or after it; a column inside a kept
    block counts once). Returns (out `[B, S, Hq, D]` fp32, lse `[B, Hq, S]` fp32, natural log).
    """
    b, s, hq, _ = q.shape
    token_block = torch.arange(s, device=q.device) // block_size
    extra = None
    if columns is not None:
        extra = column_rows(columns, hq, s)[:, :, None, :]  # [B, Hq, 1, S]

    def allowed_rows(lo, hi):
        kept = block_mask[:, :, token_block[lo:hi]][:, :, :, token_block]
        if extra is not None:
            kept = kept | extra
        return kept & _causal_rows(lo, hi, s, q.device)[None, None]

    return _masked_attention(q, k, v, allowed_rows, scale)


def column_rows(columns: torch.Tensor, num_q_heads: int, seq_len: int) -> torch.Tensor:
    """bool `[B, Hq, S]`: key token j is a column of query head h (columns int `[B, G, C]`, head h reads row
    h // (Hq / G))."""
    b, g, _ = columns.shape
    rows = torch.zeros(b, g, seq_len, dtype=torch.bool, device=columns.device)
    rows.scatter_(-1, columns.long(), True)
    return rows.repeat_interleave(num_q_heads // g, dim=1)


def proxy_columns(q, k, *, proxy_heads: int, block_size: int, num_columns: int, scale: float, keep_sink: bool, keep_diagonal: bool):
    """Vertical columns: int32 `[B, G, C]` (C = num_columns, at most S), each row ascending.

    For each proxy head (`proxy_queries_keys`): the causal softmax of its query on every row of the last query block
    against all keys, max over those rows; the C keys of largest value, ties to the lower index. Keys that every
    query seeing them keeps anyway score lowest (taken only when nothing else is left): block 0 with keep_sink,
    the last query block's keys with keep_diagonal (only that block's queries see them).
    """
    b, s, _, _ = q.shape
    if not 0 < num_columns <= s:
        raise ValueError(f"num_columns={num_columns} must lie in 1..S={s}")
    last = s - ((s - 1) // block_size) * block_size  # rows of the last query block
    rows = torch.arange(s - last, s, device=q.device)
    pq, pk = proxy_queries_keys(q[:, s - last :], k, proxy_heads)  # only the last block's queries are pooled
    logits = torch.einsum("brgd,bkgd->bgrk", pq, pk) * scale  # [B, G, rows, S]
    logits = logits.masked_fill(torch.arange(s, device=q.device)[None, :] > rows[:, None], float("-inf"))
    score = torch.softmax(logits, dim=-1).amax(dim=2)  # [B, G, S]
    covered = torch.zeros(s, dtype=torch.bool, device=q.device)
    if keep_sink:
        covered[: min(block_size, s)] = True
    if keep_diagonal:
        covered[s - last :] = True
    # Covered keys last (-1 is below every probability); a stable descending sort puts the lower index first on ties.
    key = torch.where(covered, -1.0, score)
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    return order[..., :num_columns].sort(dim=-1).values.to(torch.int32).contiguous()
