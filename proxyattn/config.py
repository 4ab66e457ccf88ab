"""The one configuration object of ProxyAttn.

`ProxyAttnConfig` is frozen and validated on construction. `to_attrs()` flattens it to a dict of int and
float values only, which is what ONNX node attributes and TensorRT plugin fields can carry; `from_attrs()`
reads such a dict back, strictly: every field must be present and of its kind (`attr_kinds()`), nothing is coerced.
Booleans travel as 0/1 and an unset `budget_fraction` as 0.0.

The two named choices, `BudgetRule` and `Estimator`, are IntEnums: the config accepts a member, its name
(`budget_rule="row_recall"`) or its number (`budget_rule=2`) and always holds the member; the number is the stable
encoding of ONNX attributes, TensorRT plugin fields and the C API (`to_attrs()` writes it), the name is what people
write and read (`repr`, CLI flags, error messages).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping

ALLOWED_BLOCK_SIZES = (64, 128)

# Prefix of every attribute name, so that config fields never collide with other node attributes.
ATTR_PREFIX = "pa_"

# dense_layer_mask stays below 2**53 so that it is exact as a float (from_attrs compares float and int values).
MAX_LAYER_MASK = 2**53

# Largest column_fraction: past half the tokens as columns, dense attention is cheaper.
MAX_COLUMN_FRACTION = 0.5
# Columns are taken in tiles of this many key tokens (the column kernel's tile).
COLUMN_TILE = 64

# Default dense crossover: with dense_below_tokens unset, sequences of at most max(min_budget_tokens, this) tokens take
# the dense path. Measured on the H100 (benchmarks/results/attention_h100.json, whole-method rows timed in interleaved
# rounds with cuDNN): with the default config the method is no faster than cuDNN up to 32K tokens on structured
# inputs (0.98x at 24K, 1.00x at 32K, 1.03x at 64K, 1.07x at 128K) and slower on diffuse ones (0.92x at 16K, 0.97x at
# 32K: the dense fallback's decision and planning launches cost 0.3-0.5 ms there). Fixed budgets (budget_fraction)
# pay off from 16K: set dense_below_tokens lower for them.
DENSE_CROSSOVER_TOKENS = 32768


class _Choice(enum.IntEnum):
    """A named choice with a stable integer encoding. Each member is declared as `NAME = number, "one-line doc"`;
    the number never changes (it is what attributes, plugin fields and the C API carry), `label` is the lower-case
    name accepted everywhere a choice is given."""

    def __new__(cls, value: int, doc: str = ""):
        member = int.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    @property
    def label(self) -> str:
        """The name accepted by `parse` and shown to people, e.g. "block_recall"."""
        return self.name.lower()

    @classmethod
    def allowed(cls) -> str:
        """The allowed values for messages: `mass (0), recall (1), ...`."""
        return ", ".join(f"{m.label} ({int(m)})" for m in cls)

    @classmethod
    def parse(cls, value: Any, what: str | None = None):
        """The member for a member, its name (case-insensitive, '-' for '_') or its number; ValueError naming
        `value` and the allowed names and numbers otherwise. bools, floats, digit strings and members of another
        choice are refused (use `parse_cli` for command-line text, where numbers arrive as strings)."""
        what = what or cls.__name__
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            member = cls.__members__.get(value.strip().replace("-", "_").upper())
            if member is not None:
                return member
        elif isinstance(value, int) and not isinstance(value, (bool, enum.Enum)):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(f"{what}={value!r} is not supported; allowed: {cls.allowed()}")

    @classmethod
    def parse_cli(cls, text: str, what: str | None = None):
        """`parse` for command-line and config-file text: a name, or a number written as digits (compatibility)."""
        if isinstance(text, str) and text.strip().isdigit():
            return cls.parse(int(text.strip()), what)
        return cls.parse(text, what)

    @classmethod
    def cli_type(cls):
        """An argparse `type=`: `parse_cli`; argparse reports a bad value with the allowed names and numbers
        ("argument --budget-rule: 'x' is not supported; allowed: mass (0), ...")."""
        import argparse

        def convert(text: str):
            try:
                return cls.parse_cli(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"{text!r} is not supported; allowed: {cls.allowed()}") from e

        convert.__name__ = cls.__name__
        return convert


class BudgetRule(_Choice):
    """How a head's gamma budget is counted (`ProxyAttnConfig.budget_rule`; `proxyattn.reference`)."""

    MASS = 0, "the paper: the fewest blocks holding gamma of the head's last-block mass, scaled by position"
    RECALL = 1, "the shortest prefix of the last block's shared ranking holding gamma of the head's own mass"
    ROW_RECALL = 2, "as recall, but gamma of the mass of every query row of the head's last block"
    BLOCK_RECALL = 3, "the default: every (head, query block) keeps the prefix of its own ranking holding gamma of each measured row"

    @property
    def per_query_block(self) -> bool:
        """True when every query block is measured on its own (no budget scaled from the last block)."""
        return self is BudgetRule.BLOCK_RECALL

    @property
    def reads_ranking(self) -> bool:
        """True when the last block's budget is counted along the proxy ranking (it needs the block scores)."""
        return self in (BudgetRule.RECALL, BudgetRule.ROW_RECALL)

    @property
    def per_row(self) -> bool:
        """True when gamma must hold for every query row of the last block, not only for their mean."""
        return self is BudgetRule.ROW_RECALL


class Estimator(_Choice):
    """How block scores are estimated (`ProxyAttnConfig.estimator`; `proxyattn.variants`)."""

    PROXY = 0, "the paper: one mean-pooled proxy query per group of heads, strided token-level scores"
    HEAD_MAX = 1, "per-head strided scores, max over each group's heads"
    BLOCK_MEAN = 2, "baseline: block-mean-pooled queries and keys per head"


# The same choices as {number: name} (what older code and the C tests read).
ESTIMATORS = {int(m): m.label for m in Estimator}
BUDGET_RULES = {int(m): m.label for m in BudgetRule}

# Config fields holding a named choice, and the choice (ints in attributes, members in the config).
CHOICE_FIELDS = {"estimator": Estimator, "budget_rule": BudgetRule}

# Optional float fields: None travels as 0.0 in attributes (0.0 is not a valid value of either).
_OPTIONAL_FLOATS = ("budget_fraction", "dense_density")

# `dense_density` is applied at this resolution (integer arithmetic, so every backend decides alike).
DENSE_DENSITY_SCALE = 1000

# Default dense fallback: a KV group whose plan keeps this share of its causal blocks runs the dense kernel. The
# block-sparse path costs as much as cuDNN at a density of about 0.72-0.81 (H100, 40K-128K), so a plan denser than
# 0.8 gains nothing from running sparse; random q/k plan about 0.84 at the default gamma and run dense. A group sent
# to cuDNN costs copies of its heads: at 0.7, structured inputs ran slower with the fallback than without it
# (0.85-1.01x against 1.08-1.10x at 16K-128K). At 0.8 the structured inputs of benchmarks/attention.py and the
# packaged models at 16K-32K plan no group that dense (docs/results.md).
DEFAULT_DENSE_DENSITY = 0.8


@dataclass(frozen=True)
class ProxyAttnConfig:
    """Every choice of the ProxyAttn algorithm.

    Attributes:
        block_size: tokens per query/key block (64 or 128).
        stride: proxy scores are computed on query rows 0, stride, 2*stride, ...; must divide block_size.
        proxy_heads: number of proxy heads; KV heads are split into this many groups (must divide Hkv).
        gamma: cumulative attention mass each head's budget must reach, in (0, 1].
        min_budget_tokens: lower bound on the tokens a head keeps per query block (rounded up to blocks).
        keep_sink: always keep key block 0.
        keep_diagonal: always keep the diagonal key block.
        dense_below_tokens: sequences with S <= this take the dense path; None means
            max(min_budget_tokens, DENSE_CROSSOVER_TOKENS = 32768), the measured length up to which the dense
            kernel is faster than estimation plus sparse attention with the default config.
        budget_fraction: if set, every head keeps this fixed fraction of key blocks instead of the gamma rule.
        dense_first_layers: model integrations (`proxyattn.hf`) keep layers 0..N-1 dense.
        dense_layer_mask: model integrations keep layer i dense when bit i is set (an explicit list of layers,
            e.g. `dense_layer_mask=ProxyAttnConfig.layer_mask([0, 5])`); below 2**53 so that it survives the
            float round trip of attributes (layers 0..52; use dense_first_layers beyond).
        estimator: how block scores are estimated (`Estimator`, given as a member, a name or a number;
            `proxyattn.variants`): "proxy" (0, the paper's mean-pooled proxy heads), "head_max" (1: per-head
            strided scores, max over each group's heads; Hq / G times the score work at the same stride, so a larger
            stride suits it), "block_mean" (2, baseline: block-mean-pooled queries and keys per head). proxy and
            head_max have Triton kernels; block_mean runs in PyTorch on any device. The TensorRT graph and
            libproxyattn implement proxy only.
        budget_rule: how the gamma budget is counted (`BudgetRule`, given as a member, a name or a number;
            `proxyattn.reference.head_budgets`): "mass" (0, the paper: the fewest blocks holding gamma of the head's
            last-block attention mass), "recall" (1: the shortest prefix of the shared ranking of the last query
            block holding gamma of the head's own mass, so a head that attends where the proxy ranking does not look
            gets a larger budget), "row_recall" (2: that prefix must hold gamma of the mass of every query row of the
            head's last block, not only of their mean; never below recall). mass, recall and row_recall measure the
            last query block only and scale its budget by position ((m+1) / Nb for query block m).
            "block_recall" (3, the default): no scaled budget; every (head, query block) keeps the shortest prefix of
            that block's own ranking holding gamma of the mass of each of `recall_rows` query rows of the block (its
            last row and every block_size / recall_rows-th row before it), at least min_budget_tokens
            (`proxyattn.reference.block_needs`). It meets the copy target at every measured length of both packaged
            models at lower density than row_recall (docs/accuracy.md). The Triton kernels, the reference, the
            TensorRT graph and libproxyattn implement all four (docs/deploy.md, per backend).
        recall_rows: query rows per block that budget_rule "block_recall" measures (a power of two dividing
            block_size); ignored by the other rules.
        dense_density: the dense fallback. A KV group (the query heads sharing one KV head) whose plan keeps at
            least this share of its causal blocks runs dense instead (exact attention; `BlockPlan.dense_heads`
            says which heads, and their counts cover every causal block); with block_recall a group whose last
            query block already needs this share is not measured further. Applied at 1/1000 resolution
            (`dense_density_permille`). None: never fall back. The default, 0.8, is about the density where the
            block-sparse path's time equals the dense kernel's (0.72-0.81 on the H100).
        column_fraction: vertical columns, in [0, 0.5]; 0 (the default) turns them off. Besides its kept blocks,
            every query head attends to the columns of its proxy head: the ceil(column_fraction * S / 64) * 64 key
            tokens (at most S) of largest proxy probability over the rows of the last query block (the same pooled
            query and key as the block scores), each seen by the queries at or after it; a column inside a kept
            block counts once. Attention that falls on scattered tokens (heavy hitters far from the query) then
            needs no whole key block per token. `BlockPlan.columns` holds them; their cost is column_fraction of the
            causal area. With columns and a fixed budget (budget_fraction) or budget rule 3 the block scores leave
            the column keys out of their max-pool, so the blocks rank by what the columns do not cover
            (`proxyattn.reference.proxy_scores`), and rule 3 counts a head's column mass as held: a row needs the
            fewest blocks that, with its columns, hold gamma of its mass. The last-block rules (mass, recall,
            row_recall) keep the full ranking and count blocks only. Columns need the proxy estimator. The
            Triton kernels, the reference and the ONNX Runtime op implement columns; the TensorRT graph, the
            TensorRT plugin, libproxyattn and packed batches refuse a non-zero value (docs/deploy.md).
    """

    block_size: int = 128
    stride: int = 4
    proxy_heads: int = 1
    gamma: float = 0.83  # block_recall at 0.83: within 3 % of dense copy loss at density <= 0.5 (docs/accuracy.md)
    min_budget_tokens: int = 2048
    keep_sink: bool = True
    keep_diagonal: bool = True
    dense_below_tokens: int | None = None
    budget_fraction: float | None = None
    dense_first_layers: int = 0
    dense_layer_mask: int = 0
    estimator: Estimator = Estimator.PROXY
    budget_rule: BudgetRule = BudgetRule.BLOCK_RECALL
    recall_rows: int = 4
    dense_density: float | None = DEFAULT_DENSE_DENSITY
    column_fraction: float = 0.0

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size)
        if self.block_size not in ALLOWED_BLOCK_SIZES:
            raise ValueError(f"block_size={self.block_size!r} is not supported; allowed: {ALLOWED_BLOCK_SIZES}")
        _check_int("stride", self.stride)
        if self.stride < 1 or self.block_size % self.stride != 0:
            raise ValueError(
                f"stride={self.stride!r} must be a positive divisor of block_size={self.block_size} "
                f"(allowed: {[s for s in range(1, self.block_size + 1) if self.block_size % s == 0]})"
            )
        _check_int("proxy_heads", self.proxy_heads)
        if self.proxy_heads < 1:
            raise ValueError(f"proxy_heads={self.proxy_heads!r} must be >= 1")
        _check_float("gamma", self.gamma)
        if not (0.0 < self.gamma <= 1.0):
            raise ValueError(f"gamma={self.gamma!r} must lie in (0, 1]")
        _check_int("min_budget_tokens", self.min_budget_tokens)
        if self.min_budget_tokens < 0:
            raise ValueError(f"min_budget_tokens={self.min_budget_tokens!r} must be >= 0")
        for name in ("keep_sink", "keep_diagonal"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool (True or False)")
        if self.dense_below_tokens is None:
            object.__setattr__(self, "dense_below_tokens", max(self.min_budget_tokens, DENSE_CROSSOVER_TOKENS))
        _check_int("dense_below_tokens", self.dense_below_tokens)
        if self.dense_below_tokens < 0:
            raise ValueError(f"dense_below_tokens={self.dense_below_tokens!r} must be >= 0")
        if self.budget_fraction is not None:
            _check_float("budget_fraction", self.budget_fraction)
            if not (0.0 < self.budget_fraction <= 1.0):
                raise ValueError(f"budget_fraction={self.budget_fraction!r} must be None or lie in (0, 1]")
        _check_int("dense_first_layers", self.dense_first_layers)
        if self.dense_first_layers < 0:
            raise ValueError(f"dense_first_layers={self.dense_first_layers!r} must be >= 0")
        _check_int("dense_layer_mask", self.dense_layer_mask)
        if not (0 <= self.dense_layer_mask < MAX_LAYER_MASK):
            raise ValueError(f"dense_layer_mask={self.dense_layer_mask!r} must lie in [0, 2**53) (bit i = layer i dense)")
        for name, choice in CHOICE_FIELDS.items():  # a member, its name or its number -> the member
            object.__setattr__(self, name, choice.parse(getattr(self, name), name))
        if self.dense_density is not None:
            _check_float("dense_density", self.dense_density)
            if not (0.0 < self.dense_density <= 1.0):
                raise ValueError(f"dense_density={self.dense_density!r} must be None (no dense fallback) or lie in (0, 1]")
        _check_float("column_fraction", self.column_fraction)
        if not (0.0 <= self.column_fraction <= MAX_COLUMN_FRACTION):
            raise ValueError(f"column_fraction={self.column_fraction!r} must lie in [0, {MAX_COLUMN_FRACTION}] (0: no columns)")
        object.__setattr__(self, "column_fraction", float(self.column_fraction))
        if self.column_fraction and self.estimator is not Estimator.PROXY:
            raise ValueError(
                f"column_fraction={self.column_fraction} with estimator={self.estimator.label}: columns come from the proxy "
                f"heads; allowed: estimator {Estimator.PROXY.label} ({int(Estimator.PROXY)}), or column_fraction 0"
            )
        _check_int("recall_rows", self.recall_rows)
        allowed_rows = [1 << i for i in range(self.block_size.bit_length()) if (1 << i) <= self.block_size]
        if self.recall_rows not in allowed_rows:
            raise ValueError(
                f"recall_rows={self.recall_rows!r} must be a power of two dividing block_size={self.block_size}; allowed: {allowed_rows}"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def dense_density_permille(self) -> int:
        """`dense_density` in thousandths (0: no fallback), what the kernels and the reference compare against."""
        return 0 if self.dense_density is None else max(1, round(self.dense_density * DENSE_DENSITY_SCALE))

    def num_columns(self, seq_len: int) -> int:
        """Column tokens per proxy head for a sequence of seq_len tokens: 0 when off, else
        ceil(column_fraction * seq_len / COLUMN_TILE) * COLUMN_TILE, at most seq_len."""
        if self.column_fraction == 0.0:
            return 0
        return min(seq_len, -(-math.ceil(self.column_fraction * seq_len) // COLUMN_TILE) * COLUMN_TILE)

    @property
    def min_budget_blocks(self) -> int:
        """Lower bound on key blocks kept per (head, query block)."""
        return -(-self.min_budget_tokens // self.block_size)

    def layer_is_sparse(self, layer_idx: int) -> bool:
        """False when layer `layer_idx` is kept dense by `dense_first_layers` or `dense_layer_mask`."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx={layer_idx!r} must be an int >= 0")
        return layer_idx >= self.dense_first_layers and not (self.dense_layer_mask >> layer_idx) & 1

    @staticmethod
    def layer_mask(layers) -> int:
        """The `dense_layer_mask` value for an iterable of layer indices (each in 0..52)."""
        mask = 0
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not (0 <= i < 53):
                raise ValueError(f"layer index {i!r} must be an int in 0..52 for dense_layer_mask")
            mask |= 1 << i
        return mask

    def replace(self, **changes: Any) -> "ProxyAttnConfig":
        """A copy with some fields changed (validated again)."""
        if "min_budget_tokens" in changes and "dense_below_tokens" not in changes:
            default = max(self.min_budget_tokens, DENSE_CROSSOVER_TOKENS)
            changes["dense_below_tokens"] = None if self.dense_below_tokens == default else self.dense_below_tokens
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ attribute round trip
    def to_attrs(self) -> dict[str, int | float]:
        """Flat dict of int and float values, keyed `pa_<field>` (ONNX attributes / TensorRT plugin fields)."""
        out: dict[str, int | float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                out[ATTR_PREFIX + f.name] = int(value)
            elif f.name in _OPTIONAL_FLOATS:
                out[ATTR_PREFIX + f.name] = 0.0 if value is None else float(value)
            elif isinstance(value, float):
                out[ATTR_PREFIX + f.name] = float(value)
            else:
                out[ATTR_PREFIX + f.name] = int(value)
        return out

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "ProxyAttnConfig":
        """Inverse of `to_attrs`, strict: every `pa_` attribute must be present and well typed.

        Keys without the `pa_` prefix are ignored (the node's other attributes). An unknown `pa_` key, a missing
        field or a value of the wrong kind raises ValueError naming the key, the value and what is allowed
        (`attr_kinds()`): bool fields take 0 or 1 (an int, a bool, or a float exactly 0.0 / 1.0, since a value may
        have travelled as a float); int fields take an int or an exactly integral finite float; float fields take a
        finite int or float. Strings, None and (for numeric fields) bools are refused, never coerced.
        """
        if not isinstance(attrs, Mapping):
            raise ValueError(f"attrs must be a mapping of attribute name to value, got {type(attrs).__name__}")
        kinds = attr_kinds()
        given = {key: value for key, value in attrs.items() if isinstance(key, str) and key.startswith(ATTR_PREFIX)}
        unknown = sorted(set(given) - set(kinds))
        if unknown:
            raise ValueError(f"unknown ProxyAttn attribute(s) {unknown}; known: {sorted(kinds)}")
        missing = [key for key in kinds if key not in given]
        if missing:
            raise ValueError(
                f"ProxyAttn attribute(s) {missing} missing; every one of {list(kinds)} is required "
                "(ProxyAttnConfig.to_attrs() writes them all)"
            )
        kwargs = {key[len(ATTR_PREFIX) :]: _decode_attr(key, given[key], kind) for key, kind in kinds.items()}
        for name in _OPTIONAL_FLOATS:
            if kwargs[name] == 0.0:
                kwargs[name] = None  # to_attrs writes an unset optional float as 0.0
        return cls(**kwargs)


def attr_kinds() -> dict[str, str]:
    """`{"pa_<field>": "bool" | "int" | "float"}` for every config field, in field order (what `from_attrs` needs)."""
    return {ATTR_PREFIX + f.name: _field_kind(f) for f in fields(ProxyAttnConfig)}


def _field_kind(f: dataclasses.Field) -> str:
    """The attribute kind of a config field, from its annotation (`bool`, `int`, `float`, optionally `| None`)."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = annotation.replace(" ", "").replace("|None", "")
    if f.name in CHOICE_FIELDS and base == CHOICE_FIELDS[f.name].__name__:
        return "int"  # a named choice travels as its number
    if base not in ("bool", "int", "float"):
        raise TypeError(
            f"ProxyAttnConfig.{f.name}: annotation {annotation!r} has no attribute kind; allowed: bool, int, float (optionally | None)"
        )
    return base


def _decode_attr(key: str, value: Any, kind: str) -> bool | int | float:
    """One attribute value checked against its kind ("bool", "int" or "float"); raises ValueError naming it."""
    if kind == "bool":
        if not isinstance(value, numbers.Real) or value not in (0, 1):
            raise ValueError(f"attribute {key}={value!r} must be 0 or 1 (an int or bool, or the float 0.0 / 1.0)")
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        allowed = "an int or an exactly integral finite float" if kind == "int" else "a finite int or float"
        raise ValueError(f"attribute {key}={value!r} must be {allowed}, not {type(value).__name__}")
    if kind == "int":
        if isinstance(value, numbers.Integral):
            return int(value)
        if not float(value).is_integer():
            raise ValueError(f"attribute {key}={value!r} must be an integer (an int or an exactly integral float)")
        return int(value)
    return float(value)


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an int")


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
