"""pytest-benchmark over the CPU smoke cases of benchmarks/: each op's forward for the eager reference and
the Triton kernel (through the interpreter), checked against the float64 reference before it is timed.

The timings are CPU smoke numbers: they keep the benchmark cases running, they are not GPU claims.
Run with ``pytest tests/test_bench_perf.py --benchmark-only`` to see the table.
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_ops, harness  # noqa: E402

CASES = (
    "patchify_gather",
    "patch_embed_gather",
    "unshuffle_mask_tokens",
    "masked_mse_loss",
    "random_masking",
    "visible_attention:tiny/encoder",
    "visible_attention:tiny/decoder",
    "visible_attention_varlen",
)


def _case(name: str) -> bench_ops.Case:
    op, _, label = name.partition(":")
    cases = bench_ops.build_cases(bench_ops.SMOKE_SHAPES, 2, torch.device("cpu"), smoke=True, with_compile=False)
    return next(c for c in cases if c.op == op and (not label or c.label == label))


@pytest.mark.parametrize("provider", ["reference", "triton"])
@pytest.mark.parametrize("name", CASES)
def test_smoke_case_forward(benchmark, name, provider):
    case = _case(name)
    impl = next(p for p in case.providers if p.name == provider)
    inputs = case.make_inputs()
    reason = impl.unavailable(*inputs)
    if reason is not None:
        pytest.skip(f"{provider} cannot run {case.op} here: {reason}")
    exact = case.exact(*bench_ops.detached_inputs(inputs, (), torch.float64))
    eager = next(p for p in case.providers if p.name == "reference").fn(*inputs)
    out = impl.fn(*inputs)
    verdict = harness.compare(out, exact, eager)
    assert verdict.ok, verdict.detail
    benchmark.extra_info.update(op=case.op, case=case.label, shape=case.shape, note="CPU smoke: not a GPU claim")
    benchmark.pedantic(impl.fn, args=inputs, rounds=3, iterations=1)
