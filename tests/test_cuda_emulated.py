"""The CUDA C++ kernels of csrc/, run on the CPU under tests/cuda_emulation, against the float64 reference.

No GPU is needed: tests/cuda_emulation/build.py compiles csrc/ with the host compiler, each CUDA thread a
coroutine (see runtime.h for what the emulation checks and what it cannot). The ops are the raw ones of
csrc/mae_fast.cpp under the namespace ``mae_fast_emu``, forward and backward, on the shapes of
tests/test_cuda_ops.py (which runs the same kernels on a GPU, through the dispatcher, when one is lent).
A pass here says the kernels' logic is right; it says nothing of their speed or of GPU-only failures.
"""

import os
import shutil

import pytest
import torch
from cuda_cases import (
    HALF_DTYPES,
    TOL,
    check_close_to_fp32,
    low_precision_attention,
)
from cuda_emulation import build as emulation

from mae_fast import reference
from mae_fast.backends.cuda import _library as cuda_library


@pytest.fixture(scope="module")
def emu():
    if shutil.which("c++") is None:
        pytest.skip("no host C++ compiler: the CUDA emulation cannot be built (these tests did NOT run)")
    if not os.path.isfile(os.path.join(emulation.cuda_include_dir(), "cuda_runtime.h")):
        pytest.skip("no CUDA headers (set CUDA_HOME): the CUDA emulation cannot be built (these tests did NOT run)")
    cuda_library.install("mae_fast_emu", "CPU")  # the schemas, fakes and formulas the real extension gets
    emulation.build(os.path.join(emulation.ROOT, "build", "cuda_emulation"))
    return torch.ops.mae_fast_emu


def _random_ids(batch: int, length: int, keep: int) -> torch.Tensor:
    return torch.argsort(torch.rand(batch, length), dim=1)[:, :keep].contiguous()


def _assert_close(mine: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str):
    """Within the dtype's tolerance, relative to the largest exact value."""
    scale = max(exact.abs().max().item(), 1e-12)
    torch.testing.assert_close(
        mine.double() / scale, exact.double() / scale, rtol=TOL[dtype], atol=TOL[dtype], msg=lambda m: f"{what}: {m}"
    )


# --- patchify / gather / scatter -------------------------------------------------------------------------


# --- unshuffle_mask_tokens -------------------------------------------------------------------------------


# --- masked_mse_loss ---------------------------------------------------------------------------------------


# --- random_masking -------------------------------------------------------------------------------------


# --- visible_attention ------------------------------------------------------------------------------------


def _attention_and_grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad.to(out.dtype))


def _check_attention(emu, q, k, v, cu_seqlens, max_seqlen, pieces):
    """The emulated forward and backward against fp32 and same-precision PyTorch over ``pieces``: the
    (start, end) token ranges of each sequence in the [T, H, d] (packed) view of q, k, v."""
    d = q.shape[-1]
    scale = d**-0.5
    out, lse = emu.visible_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    grad = torch.randn(out.shape).to(out.dtype)  # fp32 draws: torch's fp16 / bf16 ones vary by version
    dq, dk, dv = emu.visible_attention_backward(grad, q, k, v, lse, cu_seqlens, max_seqlen, scale)
    packed = [t.reshape(-1, *t.shape[-2:]) for t in (q, k, v, out, grad, dq, dk, dv)]
    q_, k_, v_, out_, grad_, *grads = packed
    lse_ = lse.reshape(lse.shape[0], -1)
    for start, end in pieces:
        inputs = [t[None, start:end] for t in (q_, k_, v_)]
        g = grad_[None, start:end]

        def exact_fn(*leaves):
            return reference.attention(*(t.float() for t in leaves), scale)[0]

        exact, exact_grads = _attention_and_grads(exact_fn, inputs, g.float())
        low, low_grads = _attention_and_grads(lambda *t: low_precision_attention(*t, scale), inputs, g)
        check_close_to_fp32(out_[None, start:end], low, exact, f"out[{start}:{end}]")
        for name, mine, lo, ex in zip("qkv", grads, low_grads, exact_grads, strict=True):
            check_close_to_fp32(mine[None, start:end], lo, ex, f"d{name}[{start}:{end}]")
        exact_lse = reference.attention(*(t.float() for t in inputs), scale)[1][0]
        torch.testing.assert_close(lse_[:, start:end], exact_lse, rtol=1e-3, atol=1e-3)


# (B, N, H, d): head dims 32 / 64 / 80 / 128, N from 1 to 256, N not a multiple of 16
ATTENTION_CASES = [(2, 50, 2, 64), (1, 197, 1, 32), (1, 65, 1, 80), (2, 17, 1, 128), (1, 1, 2, 64), (1, 256, 1, 32)]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_visible_attention_fixed_length(emu, case, dtype):
    b, n, heads, d = case
    q, k, v = torch.randn(b, n, 3, heads, d).to(dtype).unbind(2)  # strided views, as the Attention module passes
    _check_attention(emu, q, k, v, None, n, [(i * n, (i + 1) * n) for i in range(b)])


@pytest.mark.parametrize("lengths", [[5, 50, 0, 129], [49, 49, 1]], ids=str)
@pytest.mark.parametrize("d", [32, 80], ids=lambda d: f"d{d}")
def test_visible_attention_varlen(emu, lengths, d):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), 2, d).to(torch.bfloat16) for _ in range(3))
    bounds = cu.tolist()
    pieces = [(s, e) for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]
    _check_attention(emu, q, k, v, cu, max(lengths), pieces)


def test_visible_attention_is_deterministic(emu):
    q, k, v = torch.randn(1, 40, 3, 2, 64).to(torch.bfloat16).unbind(2)
    first = emu.visible_attention(q, k, v, None, 40, 0.125)
    second = emu.visible_attention(q, k, v, None, 40, 0.125)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# --- the Python side: fake implementations and autograd formulas, on the emulated kernels ----------------


def _opcheck_cases():
    leaf = lambda t: t.requires_grad_()  # noqa: E731
    qkv = [leaf(torch.randn(2, 17, 2, 32).to(torch.bfloat16)) for _ in range(3)]
    packed = [leaf(torch.randn(20, 2, 32).to(torch.bfloat16)) for _ in range(3)]
    cu = torch.tensor([0, 5, 5, 20], dtype=torch.int32)
    out, lse = torch.ops.mae_fast_emu.visible_attention(*(t.detach() for t in qkv), None, 17, 0.2)
    return {
        "visible_attention": (*qkv, None, 17, 0.2),
        "visible_attention_packed": (*packed, cu, 15, 0.2),
        "visible_attention_backward": (torch.randn_like(out), *(t.detach() for t in qkv), lse, None, 17, 0.2),
    }


@pytest.mark.parametrize(
    "name",
    [
        "visible_attention",
        "visible_attention_packed",
        "visible_attention_backward",
    ],
)
def test_fakes_and_autograd_registration_agree_with_the_kernels(emu, name):
    """torch.library.opcheck: schema, autograd registration, and fake outputs (shapes, strides, dtypes)
    equal to what the kernels return, also under AOT tracing with dynamic shapes."""
    args = _opcheck_cases()[name]
    op = getattr(emu, name.removesuffix("_packed"))
    torch.library.opcheck(op, args)


def test_attention_gradients_through_the_autograd_formula(emu):
    q, k, v = (torch.randn(1, 9, 2, 64).to(torch.bfloat16).requires_grad_() for _ in range(3))
    out, _ = emu.visible_attention(q, k, v, None, 9, 0.125)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact_grads = torch.autograd.grad(reference.attention(*exact_inputs, 0.125)[0], exact_inputs, grad.double())
    for name, mine, ex in zip("qkv", grads, exact_grads, strict=True):
        _assert_close(mine, ex, torch.bfloat16, f"d{name}")


# --- the emulation itself ---------------------------------------------------------------------------------


def _selftest(name: str, out: torch.Tensor | None = None, a=None, b=None):
    out = torch.zeros(256) if out is None else out
    empty = torch.zeros(0, dtype=torch.float16)
    torch.ops.mae_fast_emu_selftest.run(name, out, empty if a is None else a, empty if b is None else b)
    return out


def test_emulated_shuffles_and_shared_memory_compute_what_a_gpu_does(emu):
    out = _selftest("reductions", torch.zeros(2 * 96))
    t = torch.arange(96, dtype=torch.float32)
    shuffled_down = torch.where(t % 32 == 31, t, t + 1)  # lane 31 has no lane below: it keeps its own value
    assert torch.equal(out, (3 * 496 + shuffled_down).repeat(2))


def test_emulated_wmma_multiplies_tiles(emu):
    a, b = torch.randn(16, 16).half(), torch.randn(16, 16).half()
    out = _selftest("wmma", torch.zeros(16, 16), a, b)
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, message",
    [
        ("wmma_misaligned", "not 256-bit aligned"),
        ("wmma_bad_ldm", "not a multiple of 8"),
        ("divergent_barrier", "deadlock"),
        ("shuffle_from_exited_lane", "exited"),
        ("shared_memory_over_default_limit", "cudaFuncSetAttribute"),
        ("block_too_large", "invalid block size"),
    ],
)
def test_emulation_refuses_what_a_gpu_refuses(emu, name, message):
    a, b = torch.randn(16, 16).half(), torch.randn(16, 16).half()
    with pytest.raises(RuntimeError, match=message):
        _selftest(name, torch.zeros(16, 16), a, b)


def test_dynamic_shared_memory_above_48_kb_needs_the_attribute(emu):
    out = _selftest("shared_memory_with_attribute", torch.zeros(64))
    assert torch.equal(out, torch.ones(64))
