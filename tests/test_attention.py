"""visible_attention / qkv_attention on the Triton backend against the float64 reference.

fp32 is held to a tight tolerance; fp16 and bf16 to the flash-attention rule of style.md: the kernel's
error against float64 is at most twice that of a plain PyTorch attention computed in the same precision.
Forward output, lse and all three gradients are checked. On machines without a GPU the kernels run in
Triton's interpreter (tests/conftest.py), so the shapes stay small.
"""

import pytest
import torch

from mae_fast import dispatch, ops, reference
from mae_fast.ops.attention import qkv_attention

# (B, N, H, d, dtype): every N in {1, 2, 49, 50, 65, 127, 197, 300} and every d in {32, 64, 80, 128} at
# least once; 300 runs the online-softmax fallback, d=80 the padded head dim.
CASES = [
    (2, 1, 2, 32, torch.float32),
    (1, 2, 1, 64, torch.float32),
    (2, 49, 1, 80, torch.float32),
    (2, 50, 2, 64, torch.float32),
    (1, 65, 2, 80, torch.float32),
    (1, 127, 1, 128, torch.float32),
    (1, 197, 2, 32, torch.float32),
    (1, 300, 1, 64, torch.float32),
    (2, 50, 2, 64, torch.float16),
    (1, 197, 1, 32, torch.float16),
    (1, 65, 1, 80, torch.bfloat16),
    (2, 50, 1, 64, torch.bfloat16),
    (1, 2, 1, 128, torch.bfloat16),
]
FP32_TOL = dict(atol=2e-5, rtol=2e-5)


def _randn(shape, device, dtype=torch.float32):
    """Standard-normal inputs drawn in fp32 and cast: torch's own bf16 / fp16 draws for one seed differ
    between torch versions, and the same-precision rule's margin must not depend on them."""
    return torch.randn(shape, device=device).to(dtype)


def _exact(q, k, v, do, scale, cu_seqlens=None):
    """float64 reference: (out, lse, dq, dk, dv)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if cu_seqlens is None:
        out, lse = reference.attention(*leaves, scale)
    else:
        out, lse = reference.varlen_attention(*leaves, cu_seqlens, scale)
    out.backward(do.double())
    return (out.detach(), lse.double(), *(t.grad for t in leaves))


def _same_precision_torch(q, k, v, do, scale):
    """Plain PyTorch attention in the inputs' dtype (no upcast): the yardstick for fp16 / bf16 errors."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    qh, kh, vh = (t.transpose(1, 2) for t in leaves)  # [B, H, N, d]
    probs = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)
    out = (probs @ vh).transpose(1, 2)
    out.backward(do)
    return (out.detach(), *(t.grad for t in leaves))


def _triton(q, k, v, do, scale, cu_seqlens=None, max_seqlen=None):
    """The Triton primitive: (out, lse, dq, dk, dv)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if max_seqlen is None:
        max_seqlen = q.shape[1] if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out, lse = torch.ops.mae_fast_triton.visible_attention(*leaves, cu_seqlens, max_seqlen, scale)
    out.backward(do)
    if cu_seqlens is None:  # the primitive's lse is [H, B * N]; the reference's [B, H, N]
        lse = lse.view(q.shape[2], q.shape[0], q.shape[1]).transpose(0, 1)
    return (out.detach(), lse.detach(), *(t.grad for t in leaves))


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("b, n, h, d, dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_forward_lse_and_gradients_match_float64(device, b, n, h, d, dtype):
    q, k, v, do = (_randn((b, n, h, d), device, dtype) for _ in range(4))
    scale = d**-0.5
    exact = _exact(q, k, v, do, scale)
    got = _triton(q, k, v, do, scale)
    names = ("out", "lse", "dq", "dk", "dv")
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert got[1].dtype == torch.float32 and got[1].shape == (b, h, n)
    torch.testing.assert_close(got[1].double(), exact[1], atol=1e-4 if dtype != torch.float32 else 2e-5, rtol=0)
    if dtype == torch.float32:
        for name, g, e in zip(names, got, exact, strict=True):
            torch.testing.assert_close(g.double(), e, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")
        return
    yardstick = _same_precision_torch(q, k, v, do, scale)
    for name, g, y, e in zip(
        ("out", "dq", "dk", "dv"), got[:1] + got[2:], yardstick, exact[:1] + exact[2:], strict=True
    ):
        kernel_err, torch_err = _max_err(g, e), _max_err(y, e)
        assert kernel_err <= 2 * torch_err + 1e-5, (
            f"{name}: kernel error {kernel_err:.3g}, PyTorch {dtype} {torch_err:.3g}"
        )


def _poisoned_view(shape, width, device, dtype, extra_rows=0):
    """A [.., d] view into a NaN-filled buffer that is wider (head dim) and longer (tokens) than the view."""
    *lead, d = shape
    buffer = torch.full((lead[0] + extra_rows, *lead[1:], width), float("nan"), device=device, dtype=dtype)
    view = buffer[: lead[0], ..., :d]
    view.copy_(_randn(shape, device, dtype))
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_varlen_matches_each_sequence_alone_and_never_reads_padding(device, dtype):
    lengths = [1, 37, 0, 65, 5]  # 1, an empty sequence and the maximum (65)
    h, d = 2, 80  # head dim padded to 128 inside the kernel
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total = sum(lengths)
    q, k, v = (_poisoned_view((total, h, d), 128, device, dtype, extra_rows=16) for _ in range(3))
    do = _randn((total, h, d), device, dtype)
    scale = 0.1
    got = _triton(q, k, v, do, scale, cu, max(lengths))
    exact = _exact(q, k, v, do, scale, cu)
    assert got[1].shape == (h, total)
    for name, g, e in zip(("out", "lse", "dq", "dk", "dv"), got, exact, strict=True):
        assert torch.isfinite(g).all(), f"{name} read poisoned padding"
        tol = FP32_TOL if dtype == torch.float32 else dict(atol=4e-3, rtol=4e-3)
        torch.testing.assert_close(g.double(), e, **tol, msg=lambda m, name=name: f"{name}: {m}")
    if dtype == torch.float16:  # the same-precision rule, sequence by sequence
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            if end == start:
                continue
            part = [t[None, start:end] for t in (q, k, v, do)]
            yardstick = _same_precision_torch(*part, scale)
            for g, y, e in zip(got[:1] + got[2:], yardstick, exact[:1] + exact[2:], strict=True):
                assert _max_err(g[start:end], e[start:end]) <= 2 * _max_err(y[0], e[start:end]) + 1e-5


def test_fixed_length_strided_views_never_read_padding(device):
    b, n, h, d = 2, 50, 2, 32
    q, k, v = (_poisoned_view((b, n, h, d), 64, device, torch.float32, extra_rows=1) for _ in range(3))
    do = torch.randn(b, n, h, d, device=device)
    got = _triton(q, k, v, do, d**-0.5)
    exact = _exact(q, k, v, do, d**-0.5)
    for g, e in zip(got, exact, strict=True):
        torch.testing.assert_close(g.double(), e, **FP32_TOL)


@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "packed"])
def test_qkv_entry_equals_separate_q_k_v(device, packed):
    h, d = 3, 32
    if packed:
        cu = torch.tensor([0, 7, 8, 30], dtype=torch.int32, device=device)
        qkv = torch.randn(30, 3 * h * d, device=device, requires_grad=True)
    else:
        cu = None
        qkv = torch.randn(2, 20, 3 * h * d, device=device, requires_grad=True)
    out = qkv_attention(qkv, h, cu, backend="triton")
    assert out.shape == (*qkv.shape[:-1], h * d)
    grad = torch.randn_like(out)
    out.backward(grad)
    leaf = qkv.detach().clone().requires_grad_()
    q, k, v = leaf.unflatten(-1, (3, h, d)).unbind(-3)
    expected = ops.visible_attention(q, k, v, cu, backend="reference").flatten(-2)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    torch.testing.assert_close(qkv.grad, leaf.grad, **FP32_TOL)


def test_broadcast_upstream_gradient(device):
    """grad_out with zero strides (the gradient of (out * w).sum()) is read correctly."""
    w = torch.randn(32, device=device)
    inputs = torch.randn(3, 2, 9, 2, 32, device=device).unbind(0)
    grads = {}
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        (ops.visible_attention(*leaves, backend=backend) * w).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for got, expected in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(got, expected, **FP32_TOL)


def test_backward_is_bitwise_deterministic(device):
    """No atomics: two runs give identical gradients (fixed single-tile and multi-tile paths, varlen)."""
    cu = torch.tensor([0, 3, 70, 90], dtype=torch.int32, device=device)
    for shape, cu_seqlens in (((1, 50, 2, 64), None), ((1, 130, 1, 128), None), ((90, 2, 32), cu)):
        q, k, v, do = (_randn(shape, device, torch.float16) for _ in range(4))
        first = _triton(q, k, v, do, 0.125, cu_seqlens)
        second = _triton(q, k, v, do, 0.125, cu_seqlens)
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)


def test_dispatcher_triton_backend_and_default_scale(device):
    q, k, v = (torch.randn(1, 9, 2, 16, device=device) for _ in range(3))
    got = ops.visible_attention(q, k, v, backend="triton")
    torch.testing.assert_close(got, reference.attention(q, k, v)[0], **FP32_TOL)
    assert dispatch.resolve("visible_attention", "triton", q, k, v, None, None, 0.25) == "triton"


def test_triton_backend_refuses_what_it_cannot_run(device):
    q = torch.randn(1, 4, 1, 16, device=device, dtype=torch.float64)
    with pytest.raises(dispatch.BackendError, match="float64"):
        ops.visible_attention(q, q, q, backend="triton")
    wide = torch.randn(1, 4, 1, 256, device=device)
    with pytest.raises(dispatch.BackendError, match="head_dim is 256"):
        ops.visible_attention(wide, wide, wide, backend="triton")


def test_launch_grids_keep_axes_1_and_2_within_cuda_limit(monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65535 (the interpreter does not): B * H = 65536 (sequence, head)
    pairs must go on axis 0, whichever kernel runs."""
    from mae_fast.kernels import attention as kernels

    grids = []

    class _Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    for name in ("_attention_fwd_kernel", "_attention_bwd_kv_kernel", "_attention_bwd_q_kernel"):
        monkeypatch.setattr(kernels, name, _Recorder())
    for n in (50, 300):  # single-tile backward, then the separate dq kernel
        q = torch.empty(4096, n, 16, 64).as_strided((4096, n, 16, 64), (0, 0, 0, 1))
        kernels.attention_forward(q, q, q, q, torch.empty(1, 1, 1), None, n, 0.125)
        kernels.attention_backward(q, q, q, q, torch.empty(1, 1, 1), q, q, q, None, n, 0.125)
    assert len(grids) == 5
    assert all(max(grid[1:]) <= 65535 for grid in grids), grids


def test_cu_seqlens_and_max_seqlen_are_validated():
    q = torch.randn(10, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = [
        (good.long(), None, "cu_seqlens must be int32"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), None, "start at 0 and end at 10"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), None, "start at 0 and end at 10"),
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), None, "non-decreasing"),
        (torch.tensor([0], dtype=torch.int32), None, "at least 2 offsets"),
        (good[None], None, "cu_seqlens must have 1 dimensions"),
        (good, 5, "max_seqlen=5 is shorter than the longest sequence"),
        (good, -1, "max_seqlen must be a non-negative Python int"),
        (good, 6.0, "max_seqlen must be a non-negative Python int"),
    ]
    for cu, max_seqlen, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.visible_attention(q, q, q, cu, max_seqlen, backend="triton")
    with pytest.raises(ValueError, match="packed"):
        ops.visible_attention(q[None], q[None], q[None], good, backend="triton")
    with pytest.raises(ValueError, match="does not match the sequence length"):
        ops.visible_attention(q[None], q[None], q[None], None, 7, backend="triton")
    with pytest.raises(ValueError, match="3 \\* num_heads"):
        qkv_attention(torch.randn(2, 5, 40), 3)
    with pytest.raises(ValueError, match="packed"):
        qkv_attention(torch.randn(2, 5, 48), 2, good)


def test_opcheck_custom_ops(device):
    q, k, v = (torch.randn(1, 5, 1, 16, device=device, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.mae_fast_triton.visible_attention, (q, k, v, None, 5, 0.25))
    cu = torch.tensor([0, 1, 5], dtype=torch.int32, device=device)
    packed = [t.detach()[0].requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.mae_fast_triton.visible_attention, (*packed, cu, 4, 0.25))
    qkv = torch.randn(1, 5, 3 * 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mae_fast_triton.qkv_attention, (qkv, 1, None, 5, 0.25))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b, n, h, d", [(64, 50, 12, 64), (32, 65, 16, 80), (32, 197, 16, 32), (2, 2048, 4, 64)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_mae_shapes_by_the_same_precision_rule(b, n, h, d, dtype):
    q, k, v, do = (_randn((b, n, h, d), "cuda", dtype) for _ in range(4))
    scale = d**-0.5
    exact = _exact(q, k, v, do, scale)
    got = _triton(q, k, v, do, scale)
    yardstick = _same_precision_torch(q, k, v, do, scale)
    torch.testing.assert_close(got[1].double(), exact[1], atol=1e-3, rtol=0)
    for g, y, e in zip(got[:1] + got[2:], yardstick, exact[:1] + exact[2:], strict=True):
        assert _max_err(g, e) <= 2 * _max_err(y, e) + 1e-5
    again = _triton(q, k, v, do, scale)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_varlen_and_qkv_entry_by_the_same_precision_rule(dtype):
    """Encoder-like packed batch: lengths 50 +- 50% (and 1), d = 64, checked sequence by sequence."""
    lengths = [1] + torch.randint(25, 76, (31,)).tolist()
    h, d = 12, 64
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    qkv = _randn((sum(lengths), 3 * h * d), "cuda", dtype)
    do = _randn((sum(lengths), h, d), "cuda", dtype)
    q, k, v = qkv.unflatten(-1, (3, h, d)).unbind(-3)
    got = _triton(q, k, v, do, d**-0.5, cu, max(lengths))
    exact = _exact(q, k, v, do, d**-0.5, cu)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        yardstick = _same_precision_torch(*(t[None, start:end] for t in (q, k, v, do)), d**-0.5)
        for g, y, e in zip(got[:1] + got[2:], yardstick, exact[:1] + exact[2:], strict=True):
            assert _max_err(g[start:end], e[start:end]) <= 2 * _max_err(y[0], e[start:end]) + 1e-5
    leaf = qkv.clone().requires_grad_()
    out = qkv_attention(leaf, h, cu, max(lengths), backend="triton")
    out.backward(do.flatten(-2))
    torch.testing.assert_close(out, got[0].flatten(-2))
    torch.testing.assert_close(leaf.grad, torch.stack(got[2:], dim=-3).flatten(-3))
