"""linear(x, weight, bias): F.linear, with the fp32 CPU GEMMs on oneDNN where torch's default GEMM is the slow one.

torch runs fp32 matrix products on the CPU through its bundled MKL. On AMD CPUs with AVX-512 that path is about
half as fast as the oneDNN library torch also bundles: on the 2-core AMD EPYC of docs/performance.md's CPU
section, the decoder's fc1 GEMM (1576 x 512 -> 2048) took 21 ms through MKL and 10 ms through oneDNN, and the
two backward GEMMs 20-22 ms against 15 ms, with fp32 accuracy both ways. Where the CPU is such a one, this
module's ``linear`` runs forward and backward through oneDNN (one autograd formula, below); everywhere else,
and for every other dtype, device, autocast, tensor subclass and torch.compile trace, it is F.linear itself.

``MAE_FAST_CPU_GEMM`` overrides the choice: "onednn" (any x86 CPU whose torch has oneDNN), "torch" (always
F.linear) or "auto" (the default: oneDNN on AMD CPUs with AVX-512). :func:`cpu_gemm` says which is in use;
``with using("torch"):`` (or "onednn") sets it for the products formed inside (the benchmarks compare the two).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

ENV = "MAE_FAST_CPU_GEMM"
CHOICES = ("auto", "onednn", "torch")


def _onednn_unavailable_reason() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch has no torch.ops.mkldnn._linear_pointwise"
    return None


@functools.cache
def cpu_fields() -> dict[str, str]:
    """The fields ("vendor_id", "model name", "flags", ...) of the first CPU in /proc/cpuinfo; {} where there is
    none to read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            text = info.read(1 << 16)
    except OSError:
        return {}
    first = (line.split(":", 1) for line in text.split("\n\n", 1)[0].splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in first}


def _cpu_flags() -> tuple[str, set[str]]:
    """(vendor_id, flags) of the first CPU; ("", set()) where there is none to read."""
    fields = cpu_fields()
    return fields.get("vendor_id", ""), set(fields.get("flags", "").split())


def choose(requested: str, vendor: str, flags: set[str], unavailable: str | None) -> str:
    """Which of "onednn" or "torch" serves the value of MAE_FAST_CPU_GEMM ``requested`` on a CPU of ``vendor``
    with ``flags``, where oneDNN is missing for the reason ``unavailable`` (None: present)."""
    if requested not in CHOICES:
        raise ValueError(f"{ENV}={requested!r}: expected one of {', '.join(CHOICES)}")
    if requested == "onednn":
        if unavailable is not None:
            raise RuntimeError(f"{ENV}=onednn, but {unavailable}")
        return "onednn"
    if requested == "auto" and unavailable is None and vendor == "AuthenticAMD" and "avx512f" in flags:
        return "onednn"
    return "torch"


@functools.cache
def _process_default() -> str:
    return choose(os.environ.get(ENV, "auto"), *_cpu_flags(), _onednn_unavailable_reason())


_forced: str | None = None


def cpu_gemm() -> str:
    """The library that runs ``linear``'s fp32 CPU GEMMs now: "onednn" or "torch" (torch's own, MKL)."""
    return _forced or _process_default()


@contextlib.contextmanager
def using(choice: str) -> Iterator[None]:
    """Run the ``linear`` calls inside on ``choice`` ("onednn" or "torch"); their backward follows the forward."""
    global _forced
    if choice not in ("onednn", "torch"):
        raise ValueError(f"choice must be 'onednn' or 'torch', got {choice!r}")
    previous, _forced = _forced, choose(choice, "", set(), _onednn_unavailable_reason())
    try:
        yield
    finally:
        _forced = previous


def describe() -> str:
    """One line for ``mae-fast info``: the choice, what asked for it, and the reason oneDNN is missing if it is."""
    vendor, flags = _cpu_flags()
    cpu = f"CPU {vendor or 'of unknown vendor'}{' with AVX-512' if 'avx512f' in flags else ''}"
    missing = _onednn_unavailable_reason()
    try:
        chosen = cpu_gemm()
    except (ValueError, RuntimeError) as error:
        chosen = f"none: {error}"
    return f"{chosen} ({ENV}={os.environ.get(ENV, 'auto')}, {cpu}{'; ' + missing if missing else ''})"


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b_t.T ([N, K], any strides) + bias, on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """x [M, K] @ weight.T + bias with the three GEMMs (forward, grad x, grad weight) on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = _onednn_mm(grad, weight.t()) if need_x else None
        grad_weight = _onednn_mm(grad.t(), x.t()) if need_weight else None
        grad_bias = grad.sum(0) if ctx.has_bias and need_bias else None
        return grad_x, grad_weight, grad_bias


def _plain(t: torch.Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


def runs_on_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``linear(x, weight, bias)`` takes the oneDNN path (shapes that do not fit go to F.linear, which
    says what is wrong with them)."""
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and cpu_gemm() == "onednn"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.numel() > 0
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and (bias is None or tuple(bias.shape) == (weight.shape[0],))
        and _plain(x)
        and _plain(weight)
        and _plain(bias)
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), its fp32 CPU GEMMs on oneDNN where :func:`cpu_gemm` says so."""
    if not runs_on_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    out = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])
