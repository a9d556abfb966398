"""GPU tests of the CUDA backend: every op of mae_fast._C, forward and backward, against the reference
(computed in float64) and against the Triton backend where it supports the same inputs, plus one small case
of each kernel under compute-sanitizer (memcheck).

All marked ``gpu``: skipped (and reported as not run) on machines without a CUDA GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from cuda_cases import (
    HALF_DTYPES,
    check_close_to_fp32,
    low_precision_attention,
)

from mae_fast import _extension, dispatch, reference
from mae_fast.ops import (
    visible_attention,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _extension_loaded():
    assert _extension.available(), _extension.unavailable_reason()


def _triton_or_skip(op: str, *args):
    reason = dispatch.explain(op, *args)["triton"]
    if reason is not None:
        pytest.skip(f"triton backend cannot run these inputs: {reason}")


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _random_ids(batch: int, length: int, keep: int) -> torch.Tensor:
    return torch.argsort(torch.rand(batch, length, device="cuda"), dim=1)[:, :keep].contiguous()


def _randn(*shape, dtype=torch.float32) -> torch.Tensor:
    """Standard-normal draws in fp32, cast to ``dtype``: torch's own fp16 / bf16 draws for one seed differ
    between torch versions, and the tolerances below must not depend on them."""
    return torch.randn(*shape, device="cuda").to(dtype)


# --- patchify_gather -----------------------------------------------------------------------------------


# --- patch_embed_gather --------------------------------------------------------------------------------


# --- unshuffle_mask_tokens -----------------------------------------------------------------------------


# --- masked_mse_loss -----------------------------------------------------------------------------------


# --- random_masking ------------------------------------------------------------------------------------


# --- visible_attention ---------------------------------------------------------------------------------


def _qkv(b, n, heads, d, dtype):
    """q, k, v as the strided views of one fused qkv activation (what the Attention module passes)."""
    qkv = _randn(b, n, 3, heads, d, dtype=dtype).requires_grad_()
    return list(qkv.unbind(2))


# (B, N, H, d): with the N <= 256 cases of tests/test_attention.py (N = 1, 2, 49, 50, 65, 127, 197)
ATTENTION_CASES = [
    (2, 50, 3, 64),
    (2, 197, 2, 32),
    (1, 256, 2, 80),
    (3, 17, 2, 128),
    (2, 1, 2, 64),
    (1, 256, 1, 128),
    (1, 2, 1, 128),
    (2, 49, 1, 80),
    (1, 65, 2, 80),
    (1, 127, 1, 128),
]


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_visible_attention_fixed_length(case, dtype):
    b, n, heads, d = case
    q, k, v = _qkv(b, n, heads, d, dtype)
    scale = d**-0.5
    out = visible_attention(q, k, v, backend="cuda")
    assert out.shape == q.shape and out.dtype == dtype
    grad = _randn(*out.shape, dtype=out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref_inputs = [_leaf(t.float()) for t in (q, k, v)]
    ref = reference.attention(*ref_inputs, scale)[0]
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.float())
    low_inputs = [_leaf(t) for t in (q, k, v)]
    low = low_precision_attention(*low_inputs, scale)
    low_grads = torch.autograd.grad(low, low_inputs, grad)
    check_close_to_fp32(out, low, ref, "out")
    for name, mine, lo, r in zip("qkv", (dq, dk, dv), low_grads, ref_grads, strict=True):
        check_close_to_fp32(mine, lo, r, f"d{name}")
    if dispatch.explain("visible_attention", q, k, v, None, q.shape[1], q.shape[-1] ** -0.5)["triton"] is None:
        triton = visible_attention(q, k, v, backend="triton")
        check_close_to_fp32(out, low, triton, "out vs triton")


@pytest.mark.parametrize("lengths", [[5, 50, 129, 0, 256], [49, 49, 49], [1, 200, 17]])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("d", [32, 64, 80, 128])
def test_visible_attention_varlen(lengths, dtype, d):
    heads = 2
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    total = int(cu[-1])
    q, k, v = (_leaf(_randn(total, heads, d, dtype=dtype)) for _ in range(3))
    out = visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), backend="cuda")
    grad = _randn(*out.shape, dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_inputs = [_leaf(t.float()) for t in (q, k, v)]
    ref = reference.varlen_attention(*ref_inputs, cu, d**-0.5)[0]
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.float())
    # same-precision budget: each sequence through the fixed-length low-precision path
    low_inputs = [_leaf(t) for t in (q, k, v)]
    pieces = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if end > start:
            pieces.append(low_precision_attention(*(t[None, start:end] for t in low_inputs), d**-0.5)[0])
    low = torch.cat(pieces)
    low_grads = torch.autograd.grad(low, low_inputs, grad)
    check_close_to_fp32(out, low, ref, "out")
    for name, mine, lo, r in zip("qkv", grads, low_grads, ref_grads, strict=True):
        check_close_to_fp32(mine, lo, r, f"d{name}")


def test_visible_attention_is_deterministic():
    q, k, v = _qkv(4, 197, 4, 32, torch.bfloat16)
    grad = torch.randn(4, 197, 4, 32, device="cuda", dtype=torch.bfloat16)
    first = torch.autograd.grad(visible_attention(q, k, v, backend="cuda"), (q, k, v), grad)
    second = torch.autograd.grad(visible_attention(q, k, v, backend="cuda"), (q, k, v), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_auto_uses_cuda_for_short_sequences_and_falls_back_for_long_ones():
    q = torch.randn(2, 50, 4, 64, device="cuda", dtype=torch.bfloat16)
    assert dispatch.resolve("visible_attention", "auto", q, q, q, None, 50, 0.125) == "cuda"
    long = torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert "256" in dispatch.explain("visible_attention", long, long, long, None, 300, 0.125)["cuda"]
    assert dispatch.resolve("visible_attention", "auto", long, long, long, None, 300, 0.125) != "cuda"


def test_ops_compile_without_graph_breaks():
    def step(q):
        return torch.ops.mae_fast.visible_attention(q, q, q, None, q.shape[1], 0.125)[0].float().square().mean()

    q = torch.randn(2, 50, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True)
    got, expected = compiled(q), step(q)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, q)[0], torch.autograd.grad(expected, q)[0])


# --- compute-sanitizer ---------------------------------------------------------------------------------

SANITIZED_SCRIPT = textwrap.dedent(
    """
    import torch
    import mae_fast.ops as ops
    from mae_fast import reference
    dev = "cuda"
    imgs = torch.randn(2, 3, 16, 16, device=dev, requires_grad=True)
    ids_keep, ids_restore, mask = ops.random_masking(2, 16, 0.75, device=dev, backend="cuda")
    ops.patchify_gather(imgs, ids_keep, 4, backend="cuda").sum().backward()
    repeated = torch.tensor([[1, 1, 7, 1], [0, 2, 2, 15]], device=dev)
    ops.patchify_gather(imgs, repeated, 4, backend="cuda").sum().backward()
    ops.patchify(imgs, 4, backend="cuda").sum().backward()
    ops.patchify_gather(imgs.detach().half()[..., :12, :12].contiguous(), ids_keep[:, :2] % 9, 3, backend="cuda")
    weight = torch.randn(32, 3, 4, 4, device=dev, requires_grad=True)
    pos = torch.randn(16, 32, device=dev)
    ops.patch_embed_gather(imgs, ids_keep, weight, None, pos, backend="cuda").sum().backward()
    x = torch.randn(2, 5, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
    token = torch.randn(32, device=dev, requires_grad=True)
    ops.unshuffle_mask_tokens(x, token, ids_restore, torch.randn(17, 32, device=dev), backend="cuda").sum().backward()
    pred = torch.randn(2, 16, 48, device=dev, requires_grad=True)
    ops.masked_mse_loss(pred, imgs.detach(), mask, 4, backend="cuda").backward()
    cu = torch.tensor([0, 18, 18, 37], device=dev, dtype=torch.int32)
    for shape, cu in (((2, 19, 2, 64), None), ((37, 2, 80), cu)):
        q = torch.randn(shape, device=dev, dtype=torch.float16, requires_grad=True)
        ops.visible_attention(q, q, q, cu_seqlens=cu, max_seqlen=19, backend="cuda").sum().backward()
    torch.cuda.synchronize()
    print("sanitized run done")
    """
)


def test_kernels_under_compute_sanitizer():
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        pytest.skip("compute-sanitizer is not installed on this machine")
    result = subprocess.run(
        [tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", SANITIZED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0 and "sanitized run done" in result.stdout, report
    assert "ERROR SUMMARY: 0 errors" in result.stdout + result.stderr, report


def test_reference_is_float64_capable():
    # Guard for the comparisons above: the float64 reference path stays exact for a tiny case.
    x = torch.randn(1, 4, 2, 32, device="cuda", dtype=torch.float64)
    out, _ = reference.attention(x, x, x)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (x, x, x))).transpose(1, 2)
    torch.testing.assert_close(out, expected)
