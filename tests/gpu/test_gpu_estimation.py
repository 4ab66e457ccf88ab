"""The estimation kernels on the GPU against the fp32 reference: tests/gpu/check_estimation.py's checks, one test
each (its timings stay in the script: `python3 -m tests.gpu.check_estimation --out DIR` writes them). 128K cases are
also marked slow (`-m "gpu and not slow"` leaves them out)."""

import pytest
import torch

from proxyattn import ProxyAttnConfig
from tests.gpu import check_estimation as ce

pytestmark = pytest.mark.gpu


def _case_id(c) -> str:
    return "-".join(map(str, c))


def _cases(cases):
    return [pytest.param(c, id=_case_id(c), marks=[pytest.mark.slow] if c[2] >= 131072 else []) for c in cases]


@pytest.mark.parametrize("case", _cases(ce.CASES))
def test_scores_budgets_and_plan(case):
    ce.check_case(*case)


def test_fp16_case():
    ce.check_case(*ce.FP16_CASE, torch.float16)


@pytest.mark.parametrize("rule", [0, 1])
def test_varlen_packed_batch(rule):
    ce.check_varlen(rule=rule)


@pytest.mark.parametrize("cfg", [None, ProxyAttnConfig(gamma=0.95, budget_rule=3)], ids=["default", "block_recall"])
def test_plan_blocks_in_a_cuda_graph(cfg):
    ce.check_graph(cfg, timed=False)


@pytest.mark.parametrize("case", _cases(ce.RECALL_CASES))
def test_recall_budget_rule(case):
    ce.check_case(*case, rule=1)


@pytest.mark.parametrize("case", _cases(ce.ROW_RECALL_CASES))
def test_row_recall_budget_rule(case):
    ce.check_case(*case, rule=2)


@pytest.mark.parametrize("case", ce.HEAD_MAX_CASES, ids=_case_id)
def test_head_max_kernel(case):
    ce.check_head_max(*case)


@pytest.mark.parametrize("case", _cases(ce.NEEDS_CASES))
def test_block_recall_budget_rule(case):
    ce.check_needs_case(*case)


def test_block_recall_with_8_rows():
    ce.check_needs_case(*ce.NEEDS_ROWS8_CASE, rows=8)


@pytest.mark.parametrize("case", _cases(ce.NEEDS_COLUMNS_CASES))
def test_block_recall_with_vertical_columns(case):
    ce.check_needs_columns_case(*case)


def test_rank_kernel():
    ce.check_rank_kernel()


def test_dense_fallback_mixed_execution():
    ce.check_fallback_attention()


def test_block_recall_varlen_packed_batch():
    ce.check_needs_varlen()
