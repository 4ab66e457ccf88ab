"""Per-head budgets on the GPU (Triton + torch ops, no host synchronisation).

For every query head: softmax of its last `block_size` queries against all keys (causal), mean over those rows,
summed per key block; the budget is the smallest number of blocks whose cumulative mass reaches gamma, in
descending mass order (budget_rule "mass", the paper) or in the order of the last query block's shared ranking
("recall"); "row_recall" keeps the mass of every row and takes the largest prefix any row needs
(`proxyattn.reference.head_budgets`). "block_recall" counts per query block: `estimate_needs`.

Layers: `_budget_kernel` (jit; PASS 0, or PASS 1 for the TensorRT plugins), `_combine_lse_kernel`,
`_finish_mass_kernel`, `_early_dense_kernel` -> `_launch_mass` (allocate, grid) -> `head_budgets` /
`head_budgets_varlen` / `early_dense_groups` (checks, shapes).

The keys are split into chunks of key blocks so that B * Hq * chunks programs fill the GPU (a head alone has
only its 128 rows). Programs are ordered with the query heads of one KV head adjacent, so their shared K tiles
come from L2. One sweep over the keys: PASS 0 (with LOG_MASS) writes each chunk's online row max and sum and every
row's unnormalised log2 mass of every key block (`[B*Hq, Nb, block_size]`); `_combine_lse_kernel` combines the
chunks into each row's log-sum-exp (`[B*Hq, block_size]`); `_finish_mass_kernel` turns the log2 masses into the
attention mass of every key block, `[B, Hq, Nb]` (or, with ROWS, of every row and key block, `[B, Hq, block_size,
Nb]`). The TensorRT plugins still run the older two sweeps (PASS 0 without LOG_MASS, then PASS 1 recomputing the
logits against the log-sum-exp): the same masses, one more pass over the keys. Sort, cumulative sum and count are
torch ops on the device, except for the dense fallback's first decision (`early_dense_groups`), which
`_early_dense_kernel` makes in one launch per call. The dots take the inputs in their own dtype (fp16/bf16
operands, fp32 accumulation): the reference's products exactly, summed in another order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..config import ProxyAttnConfig
from .estimate_common import _LOG2E, interpreting, num_sms, qk_layout
from .estimate_rank import MAX_SORT_BLOCKS
from .estimate_scores import _online_max_sum, _seq_base, _seq_bounds

__all__ = ["head_budgets", "head_budgets_varlen", "block_mass", "early_dense_groups", "early_dense_groups_varlen"]


@triton.jit
def _budget_tile(
    q,
    k_ptrs,
    stride_kt,
    n,
    length,
    tpos,
    row_ok,
    offs_n,
    dmask,
    qk_scale,
    BS: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Logits (log2 units) of a program's query rows (positions tpos, rows with row_ok) against key block n; MASKED
    applies causality and the sequence end (also `estimate_needs`)."""
    kpos = n * BS + offs_n
    ptrs = k_ptrs + kpos.to(tl.int64)[:, None] * stride_kt
    if MASKED:
        k = tl.load(ptrs, mask=(kpos < length)[:, None] & dmask[None, :], other=0.0)
    else:
        k = tl.load(ptrs, mask=dmask[None, :], other=0.0)
    if UPCAST:  # Triton's CPU interpreter computes bf16 dots wrongly: fp32 there (exact for bf16 values)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        s = tl.where((kpos[None, :] <= tpos[:, None]) & row_ok[:, None], s, float("-inf"))
    return s


@triton.jit
def _store_mass(mass_row, n, p, inv_rows, ROWS: tl.constexpr):
    """Store the probabilities `p` [rows, keys] of key block n: per row (ROWS) or their mean over the rows."""
    if ROWS:
        tl.store(mass_row + n, tl.sum(p, axis=1))
    else:
        tl.store(mass_row + n, tl.sum(tl.sum(p, axis=1), axis=0) * inv_rows)


@triton.jit
def _mass_step(s, m_i, l_i, mass_at, store_ok):
    """One key block of a program's rows (logits s, log2 units): store each row's unnormalised log2 block mass, max +
    log2(sum exp2(logit - max)), at mass_at (-inf for a row that sees none of the block) and return the rows'
    running (max, sum) after the block (also `estimate_needs._mass_kernel`)."""
    bm = tl.max(s, axis=1)
    bm_safe = tl.where(bm > -1.0e30, bm, 0.0)  # a row that sees none of this block
    ps = tl.sum(tl.exp2(s - bm_safe[:, None]), axis=1)
    tl.store(mass_at, bm_safe + tl.log2(ps), mask=store_ok)
    m_new = tl.maximum(m_i, bm)
    return m_new, l_i * tl.exp2(m_i - m_new) + ps * tl.exp2(bm - m_new)


@triton.jit
def _budget_kernel(
    q_ptr,
    k_ptr,
    cu_ptr,
    mstat_ptr,
    lstat_ptr,
    lse_ptr,
    mass_ptr,
    seq_len,
    nb_max,
    num_q_heads,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    GROUP: tl.constexpr,
    NCHUNK: tl.constexpr,
    CB: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
    PASS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    ROWS: tl.constexpr,
    LOG_MASS: tl.constexpr = False,  # PASS 0 also writes every row's log2 block masses to mass_ptr (`_finish_mass_kernel`)
):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    hkv = h // GROUP
    start, length = _seq_bounds(cu_ptr, b, seq_len, VARLEN)
    q_base = _seq_base(q_ptr, b, start, stride_qb, stride_qt, VARLEN)
    k_base = _seq_base(k_ptr, b, start, stride_kb, stride_kt, VARLEN)
    nb = tl.cdiv(length, BS)
    n_rows = tl.minimum(length, BS)

    offs_r = tl.arange(0, BS)
    row_ok = offs_r < n_rows
    tpos = length - n_rows + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q = tl.load(
        q_base + tpos.to(tl.int64)[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & dmask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = k_base + hkv * stride_kh + offs_d[None, :] * stride_kd
    offs_n = tl.arange(0, BS)
    n_lo = c * CB
    n_hi = tl.minimum(n_lo + CB, nb)
    stat_off = (bh.to(tl.int64) * NCHUNK + c) * BS + offs_r

    # Key blocks left of n_full are visible to every row (the first row is length - n_rows): no mask there.
    n_full = tl.minimum(n_hi, tl.maximum(n_lo, (length - n_rows + 1) // BS))
    if PASS == 0:
        m_i = tl.full([BS], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BS], dtype=tl.float32)
        if LOG_MASS:  # [B*Hq, nb_max, BS]: row r's log2 mass of key block n at n * BS + r
            lm_row = mass_ptr + bh.to(tl.int64) * nb_max * BS + offs_r
            for n in range(n_lo, n_full):
                s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, row_ok, offs_n, dmask, qk_scale, BS, False, UPCAST, DOT_PREC)
                m_i, l_i = _mass_step(s, m_i, l_i, lm_row + n * BS, row_ok)
            for n in range(n_full, n_hi):
                s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, row_ok, offs_n, dmask, qk_scale, BS, True, UPCAST, DOT_PREC)
                m_i, l_i = _mass_step(s, m_i, l_i, lm_row + n * BS, row_ok)
        else:
            for n in range(n_lo, n_full):
                s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, row_ok, offs_n, dmask, qk_scale, BS, False, UPCAST, DOT_PREC)
                m_i, l_i = _online_max_sum(m_i, l_i, s)
            for n in range(n_full, n_hi):
                s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, row_ok, offs_n, dmask, qk_scale, BS, True, UPCAST, DOT_PREC)
                m_i, l_i = _online_max_sum(m_i, l_i, s)
        tl.store(mstat_ptr + stat_off, m_i)
        tl.store(lstat_ptr + stat_off, l_i)
    else:
        lse = tl.load(lse_ptr + bh.to(tl.int64) * BS + offs_r)  # log2 units; -inf on unused rows
        lse = tl.where(row_ok, lse, float("inf"))  # unused rows then give exp2(-inf) = 0
        inv_rows = 1.0 / n_rows.to(tl.float32)
        if ROWS:  # [B*Hq, BS, nb_max]: row r's mass of key block n at r * nb_max + n
            mass_row = mass_ptr + bh.to(tl.int64) * BS * nb_max + offs_r.to(tl.int64) * nb_max
        else:  # [B*Hq, nb_max]
            mass_row = mass_ptr + bh.to(tl.int64) * nb_max
        for n in range(n_lo, n_full):
            s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, row_ok, offs_n, dmask, qk_scale, BS, False, UPCAST, DOT_PREC)
            _store_mass(mass_row, n, tl.exp2(s - lse[:, None]), inv_rows, ROWS)
        for n in range(n_full, n_hi):
            s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, row_ok, offs_n, dmask, qk_scale, BS, True, UPCAST, DOT_PREC)
            _store_mass(mass_row, n, tl.exp2(s - lse[:, None]), inv_rows, ROWS)
        # Key blocks of this chunk past the sequence's end (packed batches) hold no mass.
        for n in range(tl.maximum(n_hi, n_lo), tl.minimum(n_lo + CB, nb_max)):
            _store_mass(mass_row, n, tl.zeros([BS, BS], dtype=tl.float32), inv_rows, ROWS)


_FINISH_BLOCKS = 16  # key blocks per `_finish_mass_kernel` program (16 x block_size log2 masses)


def _chunk_blocks(nb: int, programs_per_chunk: int, device) -> int:
    """Key blocks per chunk: enough chunks that B*Hq*chunks >= 4 programs per multiprocessor."""
    chunks = max(1, min(nb, -(-4 * num_sms(device) // max(1, programs_per_chunk))))
    return -(-nb // chunks)


def _launch_mass(
    q, k, cu_seqlens, batch: int, seq_len: int, block_size: int, scale: float, *, mass=None, cb: int | None = None, rows: bool = False
):
    """Attention mass per key block of each head's last query block: float32 `[B, Hq, Nb]` (rows sum to 1 over
    the sequence's blocks; blocks past a packed sequence's end hold 0), or with `rows` that of every row of the
    block, `[B, Hq, block_size, Nb]` (rows past a sequence shorter than one block hold 0)."""
    varlen = cu_seqlens is not None
    hq, hkv, d, sq, sk = qk_layout(q, k, varlen)
    bs = block_size
    nb = triton.cdiv(seq_len, bs)
    cb = cb or _chunk_blocks(nb, batch * hq, q.device)
    nchunk = triton.cdiv(nb, cb)
    dev = q.device
    mstat = torch.empty(batch * hq, nchunk, bs, device=dev, dtype=torch.float32)
    lstat = torch.empty_like(mstat)
    shape = (batch, hq, bs, nb) if rows else (batch, hq, nb)
    if mass is None:
        mass = torch.empty(shape, device=dev, dtype=torch.float32)
    assert mass.shape == shape and mass.is_contiguous()
    block_d = triton.next_power_of_2(d)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast = interpreting() and q.dtype == torch.bfloat16
    grid = (batch * hq, nchunk)
    num_warps = 8 if block_d >= 128 else 4
    common = dict(
        GROUP=hq // hkv,
        NCHUNK=nchunk,
        CB=cb,
        BS=bs,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        VARLEN=varlen,
        DOT_PREC=prec,
        UPCAST=upcast,
        ROWS=rows,
        num_warps=num_warps,
        num_stages=2,
    )
    cu = cu_seqlens if varlen else mstat
    lm = torch.empty(batch * hq, nb, bs, device=dev, dtype=torch.float32)
    args = (seq_len, nb, hq, scale * _LOG2E, *sq, *sk)
    _budget_kernel[grid](q, k, cu, mstat, lstat, mstat, lm, *args, PASS=0, LOG_MASS=True, **common)
    lse = torch.empty(batch * hq, bs, device=dev, dtype=torch.float32)
    _combine_lse_kernel[(batch * hq,)](mstat, lstat, lse, NCHUNK=nchunk, CT=min(16, triton.next_power_of_2(nchunk)), BS=bs, num_warps=4)
    block_n = _FINISH_BLOCKS
    _finish_mass_kernel[(batch * hq, triton.cdiv(nb, block_n))](
        lm, lse, mass, cu, seq_len, nb, hq, BS=bs, BLOCK_N=block_n, ROWS=rows, VARLEN=varlen, num_warps=4
    )
    return mass


@triton.jit
def _combine_lse_kernel(mstat_ptr, lstat_ptr, lse_ptr, NCHUNK: tl.constexpr, CT: tl.constexpr, BS: tl.constexpr):
    """Each row's log-sum-exp (log2 units; -inf for a row that saw no key) from the chunks' online (max, sum) of
    PASS 0, `[B*Hq, NCHUNK, BS]` -> `[B*Hq, BS]`; one program per (sequence, head), CT chunks at a time."""
    bh = tl.program_id(0)
    offs_r = tl.arange(0, BS)
    offs_c = tl.arange(0, CT)
    m_run = tl.full([BS], -1.0e30, dtype=tl.float32)
    l_run = tl.zeros([BS], dtype=tl.float32)
    for c0 in range(0, NCHUNK, CT):
        inside = (c0 + offs_c < NCHUNK)[:, None]
        at = (bh.to(tl.int64) * NCHUNK + c0 + offs_c[:, None]) * BS + offs_r[None, :]
        m = tl.load(mstat_ptr + at, mask=inside, other=-1.0e30)
        l_c = tl.load(lstat_ptr + at, mask=inside, other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        l_run = l_run * tl.exp2(m_run - m_new) + tl.sum(l_c * tl.exp2(m - m_new[None, :]), axis=0)
        m_run = m_new
    lse = tl.where(l_run > 0, m_run + tl.log2(tl.maximum(l_run, 1e-30)), float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * BS + offs_r, lse)


@triton.jit
def _finish_mass_kernel(
    lm_ptr,
    lse_ptr,
    mass_ptr,
    cu_ptr,
    seq_len,
    nb_max,
    num_q_heads,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """The attention mass of the last query block from PASS 0's log2 block masses (`LOG_MASS`) and the rows'
    log-sum-exp: lm `[B*Hq, nb_max, BS]`, lse `[B*Hq, BS]` (log2 units) -> mass `[B*Hq, nb_max]` (mean over the
    rows of exp2(lm - lse)) or with ROWS every row's, `[B*Hq, BS, nb_max]`; 0 for key blocks past the sequence's
    end and for rows past a sequence shorter than one block. One program per (sequence and head, BLOCK_N key blocks)."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // num_q_heads
    start, length = _seq_bounds(cu_ptr, b, seq_len, VARLEN)
    nb = tl.cdiv(length, BS)
    n_rows = tl.minimum(length, BS)
    offs_r = tl.arange(0, BS)
    row_ok = offs_r < n_rows
    lse = tl.load(lse_ptr + bh.to(tl.int64) * BS + offs_r)
    lse = tl.where(row_ok, lse, float("inf"))
    offs_n = c * BLOCK_N + tl.arange(0, BLOCK_N)
    at = (bh.to(tl.int64) * nb_max + offs_n)[:, None] * BS + offs_r[None, :]
    lm = tl.load(lm_ptr + at, mask=(offs_n < nb)[:, None] & row_ok[None, :], other=float("-inf"))
    p = tl.exp2(lm - lse[None, :])  # [BLOCK_N, BS]
    if ROWS:
        out = mass_ptr + bh.to(tl.int64) * BS * nb_max + offs_r[None, :].to(tl.int64) * nb_max + offs_n[:, None]
        tl.store(out, p, mask=(offs_n < nb_max)[:, None])
    else:
        inv_rows = 1.0 / tl.maximum(n_rows, 1).to(tl.float32)
        tl.store(mass_ptr + bh.to(tl.int64) * nb_max + offs_n, tl.sum(p, axis=1) * inv_rows, mask=offs_n < nb_max)


@triton.jit
def _early_dense_kernel(mass_ptr, nbseq_ptr, out_ptr, nb_max, num_kv_heads, gamma, permille, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (sequence b, KV group g): the paper's budget of each of the group's heads from its last-block
    mass `[B, Hq, nb_max]` (sort descending, cumulative sum, the fewest blocks reaching gamma, at most Nb_b), their
    sum against permille / 1000 of GROUP x Nb_b (`reference.early_dense_groups`); writes int8 0/1 to out `[B*Hkv]`."""
    pid = tl.program_id(0)  # b * Hkv + g: heads pid * GROUP .. pid * GROUP + GROUP - 1 of mass
    nb = tl.load(nbseq_ptr + pid // num_kv_heads).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    inside = offs < nb
    total = nb * 0
    for h in tl.static_range(GROUP):
        row = tl.load(mass_ptr + (pid.to(tl.int64) * GROUP + h) * nb_max + offs, mask=inside, other=0.0)
        cum = tl.cumsum(tl.sort(row, descending=True), axis=0)
        below = tl.sum(((cum < gamma) & inside).to(tl.int32), axis=0)
        total += tl.minimum(below + 1, nb)
    dense = (total * 1000 >= permille * GROUP * nb) & (nb > 0)
    tl.store(out_ptr + pid, dense.to(tl.int8))


def _early_dense(mass: torch.Tensor, nb_seq: torch.Tensor, num_kv_heads: int, cfg: ProxyAttnConfig) -> torch.Tensor:
    """bool `[B, Hkv]` from the last-block mass `[B, Hq, Nb]` and the blocks of each sequence nb_seq int64 `[B]`."""
    b, hq, nb = mass.shape
    if cfg.gamma >= 1.0:  # every head keeps every block (`head_budgets`)
        return (nb_seq > 0)[:, None].expand(b, num_kv_heads).contiguous()
    if nb > MAX_SORT_BLOCKS:  # too long to sort in registers: the torch form
        budgets = _budgets_from_mass(mass, cfg.gamma, nb_seq[:, None])
        return reference.early_dense_groups(budgets, num_kv_heads, cfg.dense_density_permille, nb_seq)
    out = torch.empty(b, num_kv_heads, device=mass.device, dtype=torch.int8)
    block = max(16, triton.next_power_of_2(nb))
    _early_dense_kernel[(b * num_kv_heads,)](
        mass,
        nb_seq,
        out,
        nb,
        num_kv_heads,
        cfg.gamma,
        cfg.dense_density_permille,
        GROUP=hq // num_kv_heads,
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return out.view(torch.bool)


def early_dense_groups(q, k, cfg: ProxyAttnConfig, scale: float) -> torch.Tensor:
    """The dense fallback's first decision (`api.early_dense_groups`), bool `[B, Hkv]`: KV groups whose heads'
    paper budgets (budget_rule "mass" on the last query block) reach cfg.dense_density of the blocks. Four launches
    (mass pass 0, log-sum-exp, masses, decision), one sweep over the keys, no host synchronisation.

    Args:
        q: `[B, S, Hq, D]`, k: `[B, S, Hkv, D]`, any strides; scale: softmax scale.
    """
    b, s, _, _ = q.shape
    mass = _launch_mass(q, k, None, b, s, cfg.block_size, scale)
    nb_seq = torch.full((b,), mass.shape[-1], device=q.device, dtype=torch.int64)
    return _early_dense(mass, nb_seq, k.shape[2], cfg)


def early_dense_groups_varlen(q, k, cu_seqlens, max_seqlen: int, cfg: ProxyAttnConfig, scale: float) -> torch.Tensor:
    """`early_dense_groups` of a packed batch (q `[T, Hq, D]`, k `[T, Hkv, D]`), each sequence with its own Nb_b."""
    bsz = cu_seqlens.shape[0] - 1
    mass = _launch_mass(q, k, cu_seqlens, bsz, max_seqlen, cfg.block_size, scale)
    return _early_dense(mass, seq_blocks(cu_seqlens, cfg.block_size), k.shape[1], cfg)


def _budgets_from_mass(mass: torch.Tensor, gamma: float, nb_seq) -> torch.Tensor:
    """Smallest number of blocks whose sorted cumulative mass reaches gamma, clamped to the sequence's blocks."""
    cum = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    needed = (cum < gamma).sum(dim=-1) + 1
    return torch.minimum(needed, nb_seq).to(torch.int32)


def _last_order(scores: torch.Tensor, cfg: ProxyAttnConfig, nb_seq: torch.Tensor) -> torch.Tensor:
    """The last query block's shared ranking, int64 `[B, R, Nb]`: row Nb_b - 1 of the scores, forced blocks
    first, then descending score, ties to the lower index (`reference.last_row_order`); nb_seq int64 `[B]`."""
    b, r, nb, _ = scores.shape
    cols = torch.arange(nb, device=scores.device)
    last = (nb_seq.clamp_min(1) - 1).reshape(b, 1, 1, 1).expand(b, r, 1, nb)
    row = scores.gather(2, last).squeeze(2).float()  # [B, R, Nb]
    visible = cols[None, None, :] <= last[..., 0, :]
    forced = torch.zeros_like(visible)
    if cfg.keep_sink:
        forced |= cols[None, None, :] == 0
    if cfg.keep_diagonal:
        forced |= cols[None, None, :] == last[..., 0, :]
    # Lexicographic (forced first, then descending score, then lower index): two stable sorts.
    by_score = torch.sort(torch.where(visible, row, float("-inf")), dim=-1, descending=True, stable=True).indices
    first = torch.sort((forced & visible).gather(-1, by_score).to(torch.int8), dim=-1, descending=True, stable=True).indices
    return by_score.gather(-1, first)


def _recall_budgets(mass: torch.Tensor, scores: torch.Tensor, cfg: ProxyAttnConfig, nb_seq: torch.Tensor) -> torch.Tensor:
    """Rule "recall": the shortest prefix of the last query block's shared ranking (`_last_order`) holding gamma
    of each head's mass. Rule "row_recall" (mass `[B, Hq, rows, Nb]`, per row): the longest such prefix over the
    rows with any mass.

    mass `[B, Hq, Nb]` or `[B, Hq, rows, Nb]`, scores `[B, R, Nb, Nb]`, nb_seq int64 `[B]` (blocks of each sequence).
    """
    b, r, nb, _ = scores.shape
    hq = mass.shape[1]
    order = _last_order(scores, cfg, nb_seq).repeat_interleave(hq // r, dim=1)  # [B, Hq, Nb]
    per_row = mass.dim() == 4
    if per_row:
        order = order.unsqueeze(2).expand_as(mass)
    cols = torch.arange(nb, device=scores.device)
    ordered = mass.gather(-1, order)
    ordered = torch.where(cols < nb_seq.reshape((b,) + (1,) * (mass.dim() - 1)), ordered, 0.0)
    cum = ordered.cumsum(dim=-1)
    needed = (cum < cfg.gamma).sum(dim=-1) + 1
    if per_row:  # rows without mass (past a sequence shorter than one block) need nothing
        needed = torch.where(cum[..., -1] > 0, needed, 0).amax(dim=-1)
    return torch.minimum(needed, nb_seq.reshape(b, 1)).to(torch.int32)


def block_mass(q, k, cfg: ProxyAttnConfig, scale: float) -> torch.Tensor:
    """Mass per key block of each head's last query block, float32 `[B, Hq, Nb]` (batched q/k, for tests)."""
    return _launch_mass(q, k, None, q.shape[0], q.shape[1], cfg.block_size, scale)


def head_budgets(q, k, cfg: ProxyAttnConfig, scale: float, *, scores=None) -> torch.Tensor:
    """Per-head budgets in key blocks, int32 `[B, Hq]` (the gamma rule; gamma = 1 keeps every block).

    Args:
        q: `[B, S, Hq, D]`, k: `[B, S, Hkv, D]`, any strides; scale: softmax scale.
        scores: `[B, R, Nb, Nb]` block scores, needed by the budget rules that read the ranking ("recall", "row_recall").
    With cfg.budget_fraction set, every head gets ceil(budget_fraction * Nb) blocks.
    """
    b, s, hq, _ = q.shape
    nb = triton.cdiv(s, cfg.block_size)
    if cfg.budget_fraction is not None:
        return _fraction_budgets(torch.full((b,), nb, device=q.device, dtype=torch.int64), hq, cfg.budget_fraction)
    if cfg.gamma >= 1.0:
        return torch.full((b, hq), nb, dtype=torch.int32, device=q.device)
    return _rule_budgets(q, k, None, b, s, cfg, scale, scores, torch.full((b,), nb, device=q.device, dtype=torch.int64))


def _rule_budgets(
    q, k, cu_seqlens, bsz: int, max_seqlen: int, cfg: ProxyAttnConfig, scale: float, scores, nb_seq: torch.Tensor
) -> torch.Tensor:
    """Budgets of the last-block rules (mass, recall, row_recall), int32 `[B, Hq]`; nb_seq int64 `[B]`."""
    rule = cfg.budget_rule
    assert not rule.per_query_block, "block_recall counts per query block: estimate_needs"
    mass = _launch_mass(q, k, cu_seqlens, bsz, max_seqlen, cfg.block_size, scale, rows=rule.per_row)
    if rule.reads_ranking:
        assert scores is not None, f"budget_rule {rule.label} needs scores"
        return _recall_budgets(mass, scores, cfg, nb_seq)
    return _budgets_from_mass(mass, cfg.gamma, nb_seq[:, None])


def seq_blocks(cu_seqlens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks of each packed sequence, int64 `[B]` (device ops, no synchronisation)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return (lengths + block_size - 1) // block_size


def _fraction_budgets(nb_seq: torch.Tensor, hq: int, fraction: float) -> torch.Tensor:
    """ceil(fraction * Nb_b) blocks (at least 1, at most Nb_b) per head, computed in float64 like the reference."""
    n = torch.ceil(nb_seq.to(torch.float64) * fraction).to(torch.int64)
    n = torch.minimum(torch.clamp(n, min=1), nb_seq)
    return n[:, None].expand(-1, hq).to(torch.int32).contiguous()


def head_budgets_varlen(q, k, cu_seqlens, max_seqlen: int, cfg: ProxyAttnConfig, scale: float, *, scores=None) -> torch.Tensor:
    """Per-head budgets of a packed batch, int32 `[B, Hq]`, each sequence on its own (its own Nb_b).

    Args:
        q: `[T, Hq, D]`, k: `[T, Hkv, D]`; cu_seqlens int32 `[B+1]`; max_seqlen host int >= every length.
        scores: `[B, R, Nb, Nb]` (`proxy_scores_varlen`), needed by "recall" and "row_recall".
    """
    bsz = cu_seqlens.shape[0] - 1
    hq = q.shape[1]
    nb_seq = seq_blocks(cu_seqlens, cfg.block_size)
    if cfg.budget_fraction is not None:
        return _fraction_budgets(nb_seq, hq, cfg.budget_fraction)
    if cfg.gamma >= 1.0:
        return nb_seq[:, None].expand(-1, hq).to(torch.int32).contiguous()
    return _rule_budgets(q, k, cu_seqlens, bsz, max_seqlen, cfg, scale, scores, nb_seq)
