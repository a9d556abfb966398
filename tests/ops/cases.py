"""What the op tests of tests/ops/ share: the backends and namespaces they run on, shapes, dtypes, input
helpers and the accuracy criteria.

Two levels, parametrised by tests/ops/conftest.py:

- the dispatch level, fixture ``backend``: the public op with ``backend=`` one of "reference", "triton"
  (Triton's interpreter on the CPU, the real kernels on a GPU) and "cuda" (the extension: GPU only);
- the primitive level, fixture ``ns``: the torch.library namespace of a compiled backend, called directly:
  ``mae_fast_triton``, ``mae_fast_emu`` (the CUDA kernels under the CPU emulation of tests/cuda_emulation)
  and ``mae_fast`` (the extension: GPU only). A primitive test runs on every namespace implementing the
  primitives it names (``@pytest.mark.primitives(...)``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from triton_aot import compile_reports

from mae_fast import dispatch, primitives
from mae_fast.backends.cuda import _library as cuda_library
from mae_fast.backends.triton import _library as triton_library

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Tolerance of a value of order 1 computed in each dtype (a few ulps), for ops that round once or twice.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The floor of the same-precision rule (assert_close_to_exact), relative to the largest exact value.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}

GATHER_SHAPES = [  # (B, C, H, W, p, K): vector paths (p % 4 == 0, C in 1/3/4) and scalar ones
    (2, 3, 32, 32, 8, 5),
    (3, 1, 28, 28, 7, 4),
    (2, 3, 16, 24, 4, 6),
    (1, 4, 16, 16, 8, 4),
    (2, 2, 12, 12, 6, 3),
    (2, 3, 64, 48, 16, 12),
    # L = 1 = K; p = 14 non-square K = L; L = 40 (not a block multiple); C = 1, K = 1; C = 20 (two channel blocks)
    (1, 1, 8, 8, 8, 1),
    (2, 3, 28, 42, 14, 6),
    (3, 3, 16, 40, 4, 7),
    (2, 1, 24, 16, 8, 1),
    (1, 20, 8, 8, 4, 2),
]

LOSS_SHAPES = [  # (B, C, H, W, p); the last five: p = 14 / 8 / 4 / 16, batch 1, non-square grids
    (2, 3, 32, 32, 8),
    (3, 1, 28, 28, 7),
    (2, 3, 32, 48, 16),
    (2, 3, 28, 28, 14),
    (1, 3, 14, 28, 14),
    (2, 1, 24, 16, 8),
    (2, 3, 12, 20, 4),
    (3, 3, 40, 56, 8),
    (1, 3, 32, 48, 16),
]


# --- what the tests run on ------------------------------------------------------------------------------

BACKENDS = ("reference", "torch", "triton", "cuda")
NAMESPACES = (triton_library.NAMESPACE, "mae_fast_emu", cuda_library.NAMESPACE)
EMULATION = "mae_fast_emu"


@dataclass(frozen=True)
class Backend:
    """A dispatch backend and the device its test inputs live on."""

    name: str
    device: torch.device

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Namespace:
    """A compiled backend's torch.library namespace and the device its primitives run on."""

    name: str
    device: torch.device

    @property
    def ops(self):
        return getattr(torch.ops, self.name)

    @property
    def triton(self) -> bool:
        return self.name == triton_library.NAMESPACE

    def __str__(self) -> str:
        return self.name


def implemented(namespace: str) -> set[str]:
    """The primitives ``namespace`` implements: the Triton backend's, or the CUDA backend's (its compiled
    ones and the few written in PyTorch), which the emulation implements too."""
    if namespace == triton_library.NAMESPACE:
        return primitives.installed(namespace)
    return set(cuda_library.COMPILED) | set(cuda_library.IN_PYTORCH)


def backend_params(names=BACKENDS) -> list:
    """pytest params of the dispatch backends ``names``; "cuda" is marked gpu."""
    return [pytest.param(name, id=name, marks=pytest.mark.gpu if name == "cuda" else ()) for name in names]


def namespace_params(needed=(), names=NAMESPACES) -> list:
    """pytest params of the namespaces of ``names`` implementing every primitive of ``needed``: the real
    extension's marked gpu, the emulation's marked cuda_emulation."""
    marks = {cuda_library.NAMESPACE: pytest.mark.gpu, EMULATION: pytest.mark.cuda_emulation}
    params = []
    for name in names:
        if set(needed) <= implemented(name):
            params.append(pytest.param(name, id=name, marks=marks.get(name, ())))
    return params


# --- inputs -----------------------------------------------------------------------------------------------


def randn(*shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard-normal draws in fp32, cast to ``dtype``: torch's own fp16 / bf16 draws for one seed differ
    between torch versions, and the tolerances must not depend on them."""
    return torch.randn(*shape, device=device).to(dtype)


def random_ids(batch: int, length: int, keep: int, device="cpu") -> torch.Tensor:
    """[batch, keep] distinct patch ids per row, as random_masking gives them."""
    return torch.argsort(torch.rand(batch, length, device=device), dim=1)[:, :keep].contiguous()


def random_restore(batch: int, length: int, device="cpu") -> torch.Tensor:
    """[batch, length] ids_restore: one permutation of 0..length-1 per row."""
    return torch.argsort(torch.rand(batch, length, device=device), dim=1)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def grads_of(fn: Callable, inputs, grad_out):
    """Forward ``fn(*inputs)`` with fresh leaves; returns (output, grads of the float leaves)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [x.grad if x is not None and x.requires_grad else None for x in leaves]


def as_float64(inputs):
    return [t.double() if t is not None and t.is_floating_point() else t for t in inputs]


def against_reference(fn: Callable, reference_fn: Callable, inputs, grad_out):
    """(output, grads) of ``fn``, of ``reference_fn`` on the same inputs, and of ``reference_fn`` in float64."""
    mine = grads_of(fn, inputs, grad_out)
    same = grads_of(reference_fn, inputs, grad_out)
    return mine, same, grads_of(reference_fn, as_float64(inputs), grad_out.double())


# --- criteria ---------------------------------------------------------------------------------------------


def assert_close_to_exact(actual, same_precision, exact64, name):
    """|actual - exact| <= 2 |same_precision - exact| + floor, elementwise maximum; NaN fails.

    ``same_precision`` is the reference computed in the kernel's own dtype (the flash-attention rule)."""
    assert actual.shape == exact64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact64.shape)}"
    assert actual.dtype == same_precision.dtype, f"{name}: dtype {actual.dtype} != {same_precision.dtype}"
    error = (actual.double() - exact64).abs().max().item()
    reference_error = (same_precision.double() - exact64).abs().max().item()
    bound = 2 * reference_error + FLOOR[actual.dtype] * max(1.0, exact64.abs().max().item())
    assert error <= bound, f"{name}: max error {error:.3g} > bound {bound:.3g} (reference error {reference_error:.3g})"


def assert_close_scaled(mine: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1.0):
    """Within ``factor`` times the dtype's tolerance, relative to the largest exact value."""
    scale = max(exact.abs().max().item(), 1e-12)
    tol = TOL[dtype] * factor
    torch.testing.assert_close(
        mine.double() / scale, exact.double() / scale, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}"
    )


def refused(backend: str, op: str, *args) -> str | None:
    """Why ``backend`` cannot run ``op`` on these (already validated) arguments, or None."""
    return dispatch.explain(op, *args)[backend]


def pin_other_ops_to_the_reference(monkeypatch, keep: set[str], backend: str) -> None:
    """Make ``backend`` run the reference for every op but those of ``keep``, so that a model-level test
    judges only the kernels of one op."""
    for op in set(dispatch.ops()) - keep:
        implementations = dispatch._ops[op].implementations
        monkeypatch.setitem(implementations, backend, implementations["reference"])


def model_matches_reference(monkeypatch, backend: Backend, ops: set[str], norm_pix_loss: bool) -> None:
    """A tiny MAE forward and backward with ``ops`` on ``backend`` (every other op on the reference) equals
    the whole model on the reference: loss, prediction, mask and every parameter's gradient."""
    from mae_fast.models import create_model

    pin_other_ops_to_the_reference(monkeypatch, ops, backend.name)
    model = create_model("mae_vit_tiny_patch4_32", depth=1, decoder_depth=1, norm_pix_loss=norm_pix_loss)
    model = model.to(backend.device)
    imgs = torch.randn(2, 3, 32, 32, device=backend.device)
    noise = torch.rand(2, model.num_patches, device=backend.device)
    results = {}
    for name in ("reference", backend.name):
        model.zero_grad()
        model.set_backend(name)
        loss, pred, mask = model(imgs, noise=noise)
        loss.backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        results[name] = loss.detach(), pred.detach(), mask, grads
    (loss, pred, mask, grads), (ref_loss, ref_pred, ref_mask, ref_grads) = results[backend.name], results["reference"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, ref_mask)
    assert grads.keys() == ref_grads.keys() and "patch_embed.proj.weight" in grads and "mask_token" in grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def opcheck(ns: Namespace, cases: dict, case: str) -> None:
    """torch.library.opcheck of ``cases[case]`` (a primitive's name, its arguments): schema, autograd
    registration, and fakes equal to what the kernels return, also under AOT tracing with dynamic shapes."""
    name, args = cases[case]
    torch.library.opcheck(getattr(ns.ops, name), args)


def assert_compiles_like_eager(step: Callable, leaves, backend: str | None = "aot_eager") -> None:
    """``step(*leaves)`` compiled with fullgraph=True (``backend``; None: inductor) gives the eager value and
    the eager gradients of every leaf: the fakes and the registered autograd trace without a graph break."""
    torch._dynamo.reset()
    compiled = (
        torch.compile(step, fullgraph=True) if backend is None else torch.compile(step, fullgraph=True, backend=backend)
    )
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, eager)
    for got_grad, eager_grad in zip(got_grads, eager_grads, strict=True):
        torch.testing.assert_close(got_grad, eager_grad)


# --- attention --------------------------------------------------------------------------------------------


def low_precision_attention(q, k, v, scale):
    """Attention computed in q's dtype by PyTorch: the error budget a same-precision kernel may have."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.einsum("bhnm,bmhd->bnhd", probs, v)


def check_same_precision(mine, low, exact, what, floor=1e-4):
    """FlashAttention's criterion: the error against the exact result (fp32 or float64 on the same rounded
    inputs) at most twice that of PyTorch in the same dtype (``low``), plus ``floor``."""
    err = (mine.double() - exact.double()).abs().max().item()
    budget = (low.double() - exact.double()).abs().max().item()
    assert err <= 2 * budget + floor, f"{what}: error {err:.3g} > 2 x {budget:.3g} + {floor:g}"


# --- Triton ahead-of-time builds (tests/triton_aot.py) ----------------------------------------------------

_aot_jobs: dict[str, list[dict]] = {}
_aot_reports: dict[str, list[dict]] = {}


def register_aot_jobs(op: str, jobs: list[dict]) -> None:
    """Called when an op's test module is imported: the Triton kernels it builds ahead of time."""
    _aot_jobs[op] = list(jobs)


def aot_reports(op: str) -> list[dict]:
    """The build reports of ``op``'s jobs. The first call builds the jobs of every op registered so far in one
    batch (fresh processes, one per core, rather than one per op); if that batch fails, each op is built
    alone, so that its failure names its own kernels."""
    if op not in _aot_reports:
        pending = {name: jobs for name, jobs in _aot_jobs.items() if name not in _aot_reports}
        batch = [dict(job, op=name) for name, jobs in pending.items() for job in jobs]
        try:
            reports = compile_reports(batch, processes=min(4, os.cpu_count() or 1))
        except AssertionError:
            _aot_reports[op] = compile_reports(_aot_jobs[op])
        else:
            for name in pending:
                _aot_reports[name] = [report for report in reports if report["op"] == name]
    return _aot_reports[op]


def check_aot_builds(op: str, archs=(80, 90)) -> list[dict]:
    """``op``'s Triton kernels build for every arch of ``archs`` without register spills; returns the reports."""
    reports = aot_reports(op)
    assert {report["arch"] for report in reports} == set(archs)
    for report in reports:
        print(f"{report['label']}: {report['text']}")
    assert all(report["spills"] == 0 for report in reports), [r["text"] for r in reports if r["spills"]]
    return reports
