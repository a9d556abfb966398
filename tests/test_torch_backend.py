"""The "torch" backend (plain PyTorch, what "auto" runs on the CPU) against the float64 reference.

Every op, forward and every gradient, on fresh random inputs with odd shapes, in float64 (where both must
agree to rounding) and in float32 / bfloat16 (within the dtype's tolerance).
"""

import pytest
import torch

from mae_fast import dispatch, ops, reference

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _grads_of(fn, inputs, grad=None):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    grad = torch.randn_like(out) if grad is None else grad
    wrt = [t for t in leaves if t.requires_grad]
    return out, torch.autograd.grad(out, wrt, grad), grad


def _compare(op_fn, inputs, dtype):
    """op_fn(*inputs, backend) on "torch" against "reference" in float64, forward and every gradient."""
    exact_inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    exact, exact_grads, grad = _grads_of(lambda *a: op_fn(*a, "reference"), exact_inputs)
    mine, mine_grads, _ = _grads_of(lambda *a: op_fn(*a, "torch"), inputs, grad.to(dtype) if dtype else grad)
    tol = TOLERANCE[inputs[0].dtype]
    scale = max(exact.abs().max().item(), 1.0)
    torch.testing.assert_close(mine.double() / scale, exact / scale, rtol=tol, atol=tol)
    for got, want in zip(mine_grads, exact_grads, strict=True):
        gscale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got.double() / gscale, want / gscale, rtol=tol, atol=tol)


DTYPES = [torch.float64, torch.float32, torch.bfloat16]


GRIDS = [(1, 1, 4, 4, 4, 1), (3, 3, 12, 8, 4, 5), (2, 2, 14, 21, 7, 6)]  # (B, C, H, W, p, K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "c", "h", "w", "p", "k"), GRIDS)
def test_patchify_and_gather(dtype, b, c, h, w, p, k):
    imgs = torch.randn(b, c, h, w, dtype=torch.float64).to(dtype)
    ids = torch.argsort(torch.rand(b, (h // p) * (w // p)), dim=1)[:, :k]
    _compare(lambda x, backend: ops.patchify(x, p, backend=backend), [imgs], None)
    _compare(lambda x, i, backend: ops.patchify_gather(x, i, p, backend=backend), [imgs, ids], None)
    _compare(lambda x, i, backend: ops.patchify_gather(x, i, p, backend=backend), [imgs, ids.int()], None)
    patches = torch.randn(b, (h // p) * (w // p), p * p * c, dtype=torch.float64).to(dtype)
    _compare(lambda x, backend: ops.unpatchify(x, p, (h // p, w // p), backend=backend), [patches], None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias_and_pos", [True, False])
def test_patch_embed_gather(dtype, with_bias_and_pos):
    b, c, h, w, p, d, k = 3, 3, 12, 8, 4, 10, 4
    imgs = torch.randn(b, c, h, w, dtype=torch.float64).to(dtype)
    ids = torch.argsort(torch.rand(b, 6), dim=1)[:, :k]
    weight = torch.randn(d, c, p, p, dtype=torch.float64).to(dtype)
    extra = [torch.randn(d, dtype=torch.float64).to(dtype), torch.randn(1, 6, d, dtype=torch.float64).to(dtype)]

    def embed(x, i, wt, *rest, backend):
        bias, pos = rest if rest else (None, None)
        return ops.patch_embed_gather(x, i, wt, bias, pos, backend=backend)

    _compare(lambda *a: embed(*a[:-1], backend=a[-1]), [imgs, ids, weight, *(extra if with_bias_and_pos else [])], None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unshuffle_and_loss(dtype):
    b, length, keep, d, p, c = 3, 9, 4, 6, 2, 3
    _, ids_restore, mask = reference.random_masking(torch.rand(b, length), keep)
    x = torch.randn(b, keep + 1, d, dtype=torch.float64).to(dtype)
    token = torch.randn(1, 1, d, dtype=torch.float64).to(dtype)
    pos = torch.randn(1, length + 1, d, dtype=torch.float64).to(dtype)
    _compare(lambda *a: ops.unshuffle_mask_tokens(a[0], a[1], ids_restore, a[2], backend=a[3]), [x, token, pos], None)
    pred = torch.randn(b, length, p * p * c, dtype=torch.float64).to(dtype)
    imgs = torch.randn(b, c, 6, 6, dtype=torch.float64).to(dtype)
    for norm_pix in (True, False):
        _compare(
            lambda pr, im, backend, n=norm_pix: ops.masked_mse_loss(pr, im, mask, p, n, backend=backend),
            [pred, imgs],
            None,
        )


@pytest.mark.parametrize("length", [1, 7, 50, 196])
def test_random_masking_equals_the_reference_bit_for_bit(length):
    noise = torch.rand(5, length)
    noise[0, : length // 2] = 0.25  # ties go to the lower index
    noise[1, ::2] = 0.0
    noise[2, 1::3] = -0.0
    for keep in sorted({1, max(1, length // 4), length}):
        mine = dispatch._ops["random_masking"].implementations["torch"].fn(noise, keep)
        for got, want in zip(mine, reference.random_masking(noise, keep), strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "n", "h", "d"), [(1, 1, 1, 8), (2, 17, 3, 16), (3, 50, 2, 64)])
def test_attention_fixed_and_qkv(dtype, b, n, h, d):
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64).to(dtype) for _ in range(3))
    _compare(lambda *a: ops.visible_attention(*a[:3], scale=0.3, backend=a[3]), [q, k, v], None)
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.float64).to(dtype)
    _compare(lambda x, backend: ops.qkv_attention(x, h, backend=backend), [qkv], None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[5], [3, 0, 7, 1], [0, 4], [6, 6, 6]])
def test_attention_packed(dtype, lengths):
    total, h, d = sum(lengths), 2, 16
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(total, h, d, dtype=torch.float64).to(dtype) for _ in range(3))
    _compare(lambda *a: ops.visible_attention(*a[:3], cu, backend=a[3]), [q, k, v], None)
    qkv = torch.randn(total, 3 * h * d, dtype=torch.float64).to(dtype)
    _compare(lambda x, backend: ops.qkv_attention(x, h, cu, backend=backend), [qkv], None)


def test_auto_runs_the_torch_backend_on_the_cpu():
    imgs = torch.randn(1, 3, 8, 8)
    assert dispatch.resolve("patchify", "auto", imgs, 4) == "torch"
    q = torch.randn(1, 5, 2, 16)
    assert dispatch.resolve("visible_attention", None, q, q, q, None, 5, 0.25) == "torch"
    assert dispatch.explain("qkv_attention", torch.randn(1, 5, 96), 2, None, 5, 0.25)["torch"] is None


def test_model_trains_the_same_on_torch_and_reference():
    from mae_fast.models import create_model

    grads = {}
    for backend in ("reference", "torch"):
        torch.manual_seed(0)
        model = create_model("mae_vit_tiny_patch4_32", depth=1, decoder_depth=1, backend=backend).double()
        imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        loss, _, _ = model(imgs, 0.75, noise=torch.rand(2, model.num_patches, dtype=torch.float64))
        loss.backward()
        grads[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (loss_r, grads_r), (loss_t, grads_t) = grads["reference"], grads["torch"]
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-12, atol=0)
    assert grads_r.keys() == grads_t.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-10, atol=1e-12, msg=name)
