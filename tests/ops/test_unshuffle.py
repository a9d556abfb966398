"""unshuffle_mask_tokens on every backend, and its primitives (unshuffle_mask_tokens and its backward) on every
namespace, against the float64 reference.

The output follows the same-precision rule (cases.assert_close_to_exact); the reference and the CUDA kernel
cast the mask token and the table to x's dtype before one rounding per element, so they agree bit for bit
(the Triton kernel adds in fp32 first). The gradient of x is a permutation of the upstream rows: exact.
"""

from __future__ import annotations

import cases
import pytest
import torch
from cases import FLOAT_DTYPES, TOL, randn, random_restore
from mae_fast.kernels import patchify_gather as gather_kernel
from mae_fast.kernels import unshuffle as unshuffle_kernel

from mae_fast import dispatch, ops, reference

# (B, L, K, Dd): small odd ones; L = K = 1; K = 1; K = L; L + 1 not a row-block multiple and Dd > BLOCK_N
# (the MAE-B decoder: test_release_sized_shapes_gpu)
UNSHUFFLE_SHAPES = [(2, 16, 4, 32), (3, 49, 13, 64), (2, 20, 7, 36), (1, 1, 1, 16), (2, 7, 1, 24), (3, 21, 21, 40)]
UNSHUFFLE_SHAPES += [(2, 37, 9, 160)]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv(gather_kernel.POISON_ENV, "1")


def unshuffle_inputs(device, shape, dtype, mask_shape=(1, 1), pos_layout="3d"):
    """x in ``dtype``; mask_token and pos_embed float32 parameters, as in the model."""
    b, length, k, dim = shape
    x = randn(b, k + 1, dim, device=device, dtype=dtype)
    mask_token = torch.randn(*mask_shape, dim, device=device)
    pos = {"none": None, "2d": torch.randn(length + 1, dim), "3d": torch.randn(1, length + 1, dim)}[pos_layout]
    return x, mask_token, random_restore(b, length, device), None if pos is None else pos.to(device)


def check_unshuffle(backend: str, inputs, dtype):
    """Forward and every gradient of the public op on ``backend`` against the reference."""
    x, _, ids_restore, _ = inputs
    b, length, dim = x.shape[0], ids_restore.shape[1], x.shape[2]
    grad_out = randn(b, length + 1, dim, device=x.device, dtype=dtype)
    public = lambda *a: ops.unshuffle_mask_tokens(*a, backend=backend)  # noqa: E731
    results = cases.against_reference(public, reference.unshuffle_mask_tokens, inputs, grad_out)
    (out, grads), (same, same_grads), (exact, exact_grads) = results
    cases.assert_close_to_exact(out, same, exact, "out")
    if backend != "triton":
        assert torch.equal(out, same), "the same casts and one rounding per element as the reference"
    assert torch.equal(grads[0], same_grads[0]), "grad of x is a permutation of grad_out's rows"
    tol = TOL[dtype] * 4
    for name, index, atol in (("mask_token", 1, tol * (b * length) ** 0.5), ("pos_embed", 3, tol * b**0.5)):
        if exact_grads[index] is None:
            assert grads[index] is None, name
            continue
        cases.assert_close_to_exact(grads[index], same_grads[index], exact_grads[index], f"grad of {name}")
        torch.testing.assert_close(grads[index].double(), exact_grads[index], rtol=tol, atol=atol, msg=name)


# --- the public op, on every backend ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", UNSHUFFLE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "no_pos"])
def test_unshuffle_mask_tokens_forward_backward(backend, shape, dtype, with_pos):
    inputs = unshuffle_inputs(backend.device, shape, dtype, pos_layout="3d" if with_pos else "none")
    check_unshuffle(backend.name, inputs, dtype)
    if backend.name == "cuda" and cases.refused("triton", "unshuffle_mask_tokens", *inputs) is None:
        x, mask_token, ids_restore, pos = inputs
        out = ops.unshuffle_mask_tokens(*inputs, backend="cuda")
        triton = ops.unshuffle_mask_tokens(*inputs, backend="triton")
        if dtype == torch.float32 or pos is None:
            assert torch.equal(out, triton)
        else:  # Triton adds the fp32 mask token and table before its one rounding; CUDA casts them first
            atol = 2 * TOL[dtype] * max(t.abs().max().item() for t in (x, mask_token, pos))
            torch.testing.assert_close(out.double(), triton.double(), rtol=0, atol=atol)


@pytest.mark.parametrize("mask_shape,pos_layout", [((), "none"), ((1, 1), "2d")])
def test_unshuffle_mask_tokens_optional_inputs(backend, mask_shape, pos_layout):
    inputs = unshuffle_inputs(backend.device, (2, 11, 4, 24), torch.float16, mask_shape, pos_layout)
    check_unshuffle(backend.name, inputs, torch.float16)


def test_unshuffle_mask_tokens_non_contiguous(backend):
    x, mask_token, ids_restore, pos = unshuffle_inputs(backend.device, (2, 11, 4, 24), torch.float32)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)
    ids_restore = ids_restore.t().contiguous().t()
    assert not x.is_contiguous() and not ids_restore.is_contiguous()
    check_unshuffle(backend.name, (x, mask_token, ids_restore, pos), torch.float32)


def test_int32_ids_give_the_same_results(backend):
    x, mask_token, ids_restore, pos = unshuffle_inputs(backend.device, (2, 11, 4, 24), torch.float32)
    grad = torch.randn(2, 12, 24, device=backend.device)
    results = [
        cases.grads_of(lambda *a: ops.unshuffle_mask_tokens(*a, backend=backend.name), (x, mask_token, i, pos), grad)
        for i in (ids_restore, ids_restore.int())
    ]
    (out64, grads64), (out32, grads32) = results
    assert torch.equal(out64, out32) and torch.equal(grads64[0], grads32[0]) and torch.equal(grads64[1], grads32[1])


@pytest.mark.backends("triton", "cuda")
def test_model_matches_reference(backend, monkeypatch):
    """The tiny MAE with unshuffle_mask_tokens on this backend (every other op on the reference; the raw-pixel
    loss here, the normalised one in test_patch_embed.py's model test)."""
    cases.model_matches_reference(monkeypatch, backend, {"unshuffle_mask_tokens"}, norm_pix_loss=False)


def test_bad_input_is_a_clear_error(backend, monkeypatch):
    x, mask_token, ids_restore, pos = unshuffle_inputs(backend.device, (2, 6, 4, 24), torch.float32)
    name = backend.name
    cases = [
        (lambda: ops.unshuffle_mask_tokens(x, mask_token, ids_restore.float(), pos, backend=name), "int64"),
        (lambda: ops.unshuffle_mask_tokens(x[:1], mask_token, ids_restore, pos, backend=name), "batch size"),
        (lambda: ops.unshuffle_mask_tokens(x, mask_token.to("meta"), ids_restore, pos, backend=name), "device"),
        (lambda: ops.unshuffle_mask_tokens(x, mask_token[..., :3], ids_restore, pos, backend=name), "mask_token"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    monkeypatch.setenv("MAE_FAST_CHECK_INDICES", "1")  # index values are read on the host: on a GPU when asked
    with pytest.raises(ValueError, match="ids_restore"):
        ops.unshuffle_mask_tokens(x, mask_token, ids_restore + 6, pos, backend=name)


@pytest.mark.backends("triton", "cuda")
def test_refusals_name_the_reason(backend, monkeypatch):
    """float64 is refused by both kernels; ids_restore rows that are not permutations by Triton's."""
    monkeypatch.setenv("MAE_FAST_CHECK_INDICES", "1")  # the permutation check reads the ids on the host
    x, mask_token, ids_restore, pos = unshuffle_inputs(backend.device, (1, 4, 2, 16), torch.float64)
    with pytest.raises(dispatch.BackendError, match="x is float64"):
        ops.unshuffle_mask_tokens(x, mask_token, ids_restore, pos, backend=backend.name)
    if backend.name == "triton":
        x, mask_token, _, _ = unshuffle_inputs(backend.device, (1, 4, 2, 16), torch.float32)
        not_a_permutation = torch.tensor([[0, 1, 1, 3]], device=backend.device)
        with pytest.raises(dispatch.BackendError, match="permutations of 0..3"):
            ops.unshuffle_mask_tokens(x, mask_token, not_a_permutation, backend="triton")


@pytest.mark.gpu
@pytest.mark.backends("triton", "cuda")
@pytest.mark.parametrize("shape", [(16, 196, 49, 512), (1, 196, 50, 512)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "no_pos"])
def test_release_sized_shapes_gpu(backend, shape, dtype, with_pos):
    """The MAE-B decoder input: K = 49 or 50 of 196, 512 wide."""
    inputs = unshuffle_inputs(backend.device, shape, dtype, pos_layout="3d" if with_pos else "none")
    check_unshuffle(backend.name, inputs, dtype)


# --- the primitives, on every namespace ------------------------------------------------------------------


@pytest.mark.primitives("unshuffle_mask_tokens", "unshuffle_mask_tokens_backward")
@pytest.mark.parametrize("shape", [(2, 16, 4, 32), (3, 9, 2, 12), (1, 49, 12, 64), (2, 5, 5, 8)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "no_pos"])
def test_unshuffle_primitives(ns, shape, dtype, with_pos):
    """The forward within the dtype's tolerance; the backward: x's rows moved back exactly, the mask token's
    fp32 sum (an empty tensor when not asked for)."""
    b, length, keep, dim = shape
    x, mask_token = randn(b, keep + 1, dim, device=ns.device, dtype=dtype), randn(dim, device=ns.device, dtype=dtype)
    pos = randn(length + 1, dim, device=ns.device, dtype=dtype) if with_pos else None
    ids_restore = random_restore(b, length, ns.device)
    out = ns.ops.unshuffle_mask_tokens(x, mask_token, ids_restore, pos)
    leaves = [x.double().requires_grad_(), mask_token.double().requires_grad_()]
    exact = reference.unshuffle_mask_tokens(*leaves, ids_restore, None if pos is None else pos.double())
    assert out.dtype == dtype
    cases.assert_close_scaled(out, exact, dtype, "out")

    grad = randn(b, length + 1, dim, device=ns.device, dtype=dtype)
    exact.backward(grad.double())
    grad_x, grad_mask_token = ns.ops.unshuffle_mask_tokens_backward(grad, ids_restore, keep, True)
    assert torch.equal(grad_x.double(), leaves[0].grad)  # a permutation of grad's rows
    assert grad_mask_token.dtype == torch.float32
    torch.testing.assert_close(grad_mask_token.double(), leaves[1].grad, rtol=1e-5, atol=1e-5)
    assert ns.ops.unshuffle_mask_tokens_backward(grad, ids_restore, keep, False)[1].numel() == 0


@pytest.mark.primitives("unshuffle_mask_tokens", "unshuffle_mask_tokens_backward")
def test_unshuffle_gradients_through_the_autograd_formula(ns):
    x, mask_token, pos = (torch.randn(2, 4, 8), torch.randn(8), torch.randn(7, 8))
    ids_restore = random_restore(2, 6)
    leaves = [t.to(ns.device, copy=True).requires_grad_() for t in (x, mask_token, pos)]
    exact = [t.double().requires_grad_() for t in (x, mask_token, pos)]
    grad = torch.randn(2, 7, 8)
    ns.ops.unshuffle_mask_tokens(leaves[0], leaves[1], ids_restore.to(ns.device), leaves[2]).backward(
        grad.to(ns.device)
    )
    reference.unshuffle_mask_tokens(exact[0], exact[1], ids_restore, exact[2]).backward(grad.double())
    for name, mine, ex in zip(("x", "mask_token", "pos_embed"), leaves, exact, strict=True):
        cases.assert_close_scaled(mine.grad.cpu(), ex.grad, torch.float32, f"grad {name}")


@pytest.mark.primitives("unshuffle_mask_tokens_backward")
def test_unshuffle_backward_is_deterministic(ns):
    """The mask token's gradient is a fixed-order fp32 reduction: the same bits run to run."""
    ids_restore = random_restore(6, 30, ns.device)
    grad = torch.randn(6, 31, 40, device=ns.device)
    first = ns.ops.unshuffle_mask_tokens_backward(grad, ids_restore, 7, True)
    second = ns.ops.unshuffle_mask_tokens_backward(grad, ids_restore, 7, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _opcheck_cases(device):
    x, mask_token, ids_restore, pos = unshuffle_inputs(device, (2, 6, 3, 24), torch.float32)
    x, mask_token, pos = (t.requires_grad_() for t in (x, mask_token, pos))
    return {
        "unshuffle_mask_tokens": ("unshuffle_mask_tokens", (x, mask_token, ids_restore, pos)),
        "unshuffle_mask_tokens_backward": (
            "unshuffle_mask_tokens_backward",
            (torch.randn(2, 7, 24, device=device), ids_restore, 3, True),
        ),
    }


@pytest.mark.primitives("unshuffle_mask_tokens", "unshuffle_mask_tokens_backward")
@pytest.mark.parametrize("case", ["unshuffle_mask_tokens", "unshuffle_mask_tokens_backward"])
def test_opcheck(ns, case):
    cases.opcheck(ns, _opcheck_cases(ns.device), case)


@pytest.mark.primitives("unshuffle_mask_tokens", "unshuffle_mask_tokens_backward")
def test_torch_compile_fullgraph(ns):
    """Forward and the gradients of x and the mask token in one traced graph (aot_eager)."""
    x, mask_token, ids_restore, pos = unshuffle_inputs(ns.device, (2, 6, 3, 24), torch.float32)

    def step(x, mask_token):
        return ns.ops.unshuffle_mask_tokens(x, mask_token, ids_restore, pos).square().sum()

    cases.assert_compiles_like_eager(step, [t.requires_grad_() for t in (x, mask_token)])


@pytest.mark.gpu
@pytest.mark.primitives("unshuffle_mask_tokens", "unshuffle_mask_tokens_backward")
@pytest.mark.namespaces("mae_fast_triton")  # one inductor build per op: the GPU stage has little time
def test_torch_compile_inductor_gpu(ns):
    """Inductor around the primitive (the public op's dispatcher is not traced: see the test above)."""
    x, mask_token, ids_restore, pos = unshuffle_inputs(ns.device, (8, 12, 3, 128), torch.bfloat16)

    def step(x):
        return ns.ops.unshuffle_mask_tokens(x, mask_token, ids_restore, pos).float().square().sum()

    cases.assert_compiles_like_eager(step, [x.requires_grad_()], backend=None)


# --- the Triton kernels: ahead-of-time builds for the GPU ------------------------------------------------


def _unshuffle_job(dtype, arch, backward):
    constexprs = {"BLOCK_R": unshuffle_kernel.BLOCK_ROWS, "BLOCK_N": unshuffle_kernel.block_n(512)}
    if backward:
        signature = {"grad_ptr": f"*{dtype}", "ids_ptr": "*i64", "grad_x_ptr": f"*{dtype}", "partial_ptr": "*fp32"}
        kernel = "_unshuffle_backward_kernel"
    else:
        names = ("x_ptr", "mask_ptr", "ids_ptr", "pos_ptr", "out_ptr")
        signature = dict(zip(names, (f"*{dtype}", "*fp32", "*i64", "*fp32", f"*{dtype}"), strict=True))
        constexprs = {"HAS_POS": True, **constexprs}
        kernel = "_unshuffle_kernel"
    signature.update(dict.fromkeys(("num_visible", "L", "N"), "i32"))
    return "mae_fast.kernels.unshuffle", kernel, signature, constexprs, arch, 4, 3


def aot_jobs():
    """The launchers' default configs at the MAE-B decoder's width (Dd = 512)."""
    jobs = {
        "unshuffle bf16": _unshuffle_job("bf16", 90, False),
        "unshuffle fp16": _unshuffle_job("fp16", 80, False),
        "unshuffle backward bf16": _unshuffle_job("bf16", 90, True),
        "unshuffle backward fp32": _unshuffle_job("fp32", 80, True),
    }
    keys = ("module", "kernel", "signature", "constexprs", "arch", "num_warps", "num_stages")
    return [{"label": label, **dict(zip(keys, job, strict=True))} for label, job in jobs.items()]


cases.register_aot_jobs("unshuffle", aot_jobs())


def test_triton_kernels_compile_for_sm90_and_sm80_without_spills():
    cases.check_aot_builds("unshuffle")
