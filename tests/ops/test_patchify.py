"""patchify, unpatchify and patchify_gather on every backend, and their primitives (patchify, unpatchify,
gather_patches, scatter_patches) on every namespace, against the reference.

Pure data movement: every result must equal the reference bit for bit. The Triton gather kernels start
their outputs as NaN here (MAE_FAST_POISON_OUTPUTS), so an element they do not write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from cases import (
    FLOAT_DTYPES,
    GATHER_SHAPES,
    assert_compiles_like_eager,
    check_aot_builds,
    grads_of,
    leaf,
    opcheck,
    randn,
    random_ids,
    refused,
    register_aot_jobs,
)
from mae_fast.kernels import patchify_gather as gather_kernel

from mae_fast import dispatch, ops, reference


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv(gather_kernel.POISON_ENV, "1")


def conv_order_gather(imgs: torch.Tensor, ids_keep: torch.Tensor, p: int) -> torch.Tensor:
    """The visible patches in the Conv2d weight's (c, i, j) order."""
    b, c, h, w = imgs.shape
    patches = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    return reference.gather_tokens(patches, ids_keep)


# --- the public ops, on every backend --------------------------------------------------------------------


@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (torch.float64,), ids=str)
def test_patchify_gather_forward_backward(backend, shape, dtype):
    """Forward and the gradient of imgs equal the reference exactly; the CUDA kernels refuse float64."""
    b, c, h, w, p, k = shape
    imgs = randn(b, c, h, w, device=backend.device, dtype=dtype)
    ids = random_ids(b, (h // p) * (w // p), k, backend.device)
    if backend.name == "cuda" and dtype == torch.float64:
        with pytest.raises(dispatch.BackendError, match="imgs is float64; the CUDA gather kernel takes float32"):
            ops.patchify_gather(imgs, ids, p, backend="cuda")
        return
    grad_out = randn(b, k, p * p * c, device=backend.device, dtype=dtype)
    public = lambda x, i: ops.patchify_gather(x, i, p, backend=backend.name)  # noqa: E731
    out, (grad_imgs, _) = grads_of(public, (imgs, ids), grad_out)
    expected, (expected_grad, _) = grads_of(lambda x, i: reference.patchify_gather(x, i, p), (imgs, ids), grad_out)
    assert torch.equal(out, expected)
    assert torch.equal(grad_imgs, expected_grad)
    if backend.name == "cuda" and refused("triton", "patchify_gather", imgs, ids, p) is None:
        assert torch.equal(out, ops.patchify_gather(imgs, ids, p, backend="triton"))


def test_patchify_gather_backward_sums_repeated_ids(backend, monkeypatch):
    """Repeated ids: the gradient sums over the copies; the Triton backward (no atomics) refuses them."""
    monkeypatch.setenv("MAE_FAST_CHECK_INDICES", "1")  # the distinct-ids check reads the ids on the host
    imgs = torch.randn(2, 3, 16, 16, device=backend.device)
    ids = torch.tensor([[0, 5, 0, 3], [15, 15, 15, 2]], device=backend.device)
    if backend.name == "triton":
        with pytest.raises(dispatch.BackendError, match="distinct ids"):
            ops.patchify_gather(imgs, ids, 4, backend="triton")
        return
    mine, theirs = leaf(imgs), leaf(imgs)
    grad = torch.randn(2, 4, 48, device=backend.device)
    ops.patchify_gather(mine, ids, 4, backend=backend.name).backward(grad)
    reference.patchify_gather(theirs, ids, 4).backward(grad)
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 8, 8, 8), (2, 3, 28, 42, 14), (2, 3, 12, 20, 4)], ids=str)
def test_patchify_and_unpatchify_on_every_patch(backend, shape):
    """The model's patchify / unpatchify methods: forward and backward, every patch kept."""
    b, c, h, w, p = shape
    imgs = torch.randn(b, c, h, w, device=backend.device)
    grad = torch.randn(b, (h // p) * (w // p), p * p * c, device=backend.device)
    patches, (grad_imgs,) = grads_of(lambda x: ops.patchify(x, p, backend=backend.name), (imgs,), grad)
    expected, (expected_grad,) = grads_of(lambda x: reference.patchify(x, p), (imgs,), grad)
    assert torch.equal(patches, expected) and torch.equal(grad_imgs, expected_grad)
    back, (grad_patches,) = grads_of(
        lambda x: ops.unpatchify(x, p, (h // p, w // p), backend=backend.name), (patches,), imgs
    )
    assert torch.equal(back, imgs)
    assert torch.equal(grad_patches, expected)


@pytest.mark.parametrize("layout", ["channels_last", "cropped", "int32_strided_ids"])
def test_patchify_gather_non_contiguous(backend, layout):
    b, c, h, w, p, k = 2, 3, 16, 24, 8, 4
    big = torch.randn(b, c, h + 3, w + 5, device=backend.device)
    imgs = big[:, :, 1 : h + 1, 2 : w + 2] if layout == "cropped" else big[:, :, :h, :w].contiguous()
    if layout == "channels_last":
        imgs = imgs.to(memory_format=torch.channels_last)
    ids = random_ids(b, 6, 2 * k if layout == "int32_strided_ids" else k, backend.device)
    if layout == "int32_strided_ids":
        ids = ids.to(torch.int32)[:, ::2]
        assert not ids.is_contiguous()
    expected = reference.patchify_gather(imgs, ids.long(), p)
    assert torch.equal(ops.patchify_gather(imgs, ids, p, backend=backend.name), expected)


def test_bad_input_is_a_clear_error(backend, monkeypatch):
    imgs = torch.randn(2, 3, 16, 24, device=backend.device)
    ids = random_ids(2, 6, 4, backend.device)
    cases = [
        (lambda: ops.patchify_gather(imgs, ids.float(), 8, backend=backend.name), "ids_keep must be int64 or int32"),
        (lambda: ops.patchify_gather(imgs, ids[:1], 8, backend=backend.name), "ids_keep batch size 1"),
        (lambda: ops.patchify_gather(imgs, ids, 5, backend=backend.name), "divisible by patch_size=5"),
        (lambda: ops.patchify_gather(imgs, ids.to("meta"), 8, backend=backend.name), "one device"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    monkeypatch.setenv("MAE_FAST_CHECK_INDICES", "1")  # index values are read on the host: on a GPU when asked
    for bad, message in ((ids + 6, r"ids_keep values must lie in \[0, 6\)"), (ids - 1, "ids_keep values")):
        with pytest.raises(ValueError, match=message):
            ops.patchify_gather(imgs, bad, 8, backend=backend.name)


# --- the primitives, on every namespace ------------------------------------------------------------------


@pytest.mark.primitives("patchify", "unpatchify")
@pytest.mark.parametrize("shape", [(2, 3, 8, 12, 4), (1, 1, 14, 7, 7), (2, 4, 16, 16, 8)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_patchify_and_unpatchify_primitives(ns, shape, dtype):
    b, c, h, w, p = shape
    imgs = randn(b, c, h, w, device=ns.device, dtype=dtype)
    patches = ns.ops.patchify(imgs, p)
    assert torch.equal(patches, reference.patchify(imgs, p))
    assert torch.equal(ns.ops.unpatchify(patches, p, h // p, w // p), imgs)


@pytest.mark.primitives("gather_patches", "scatter_patches")
@pytest.mark.namespaces("mae_fast_emu", "mae_fast")
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [True, False], ids=["ijc", "cij"])
def test_gather_and_scatter_patches(ns, shape, dtype, channels_last):
    """Both patch orders, int64 and int32 ids; the scatter is the gather's backward. On the CUDA kernels'
    vector and scalar paths; Triton's gather and scatter (one path for every shape) run this grid through
    the public op above, both orders in the adjoint and opcheck tests and through patch_embed_gather."""
    b, c, h, w, p, keep = shape
    imgs = randn(b, c, h, w, device=ns.device, dtype=dtype)
    length = (h // p) * (w // p)
    for ids in (random_ids(b, length, keep, ns.device), random_ids(b, length, keep, ns.device).int()):
        expected = reference.patchify_gather(imgs, ids, p) if channels_last else conv_order_gather(imgs, ids, p)
        assert torch.equal(ns.ops.gather_patches(imgs, ids, p, channels_last), expected)
        # every kept pixel gets its gradient, the rest 0
        grad = randn(b, keep, c * p * p, device=ns.device, dtype=dtype)
        x = imgs.double().requires_grad_()
        gathered = reference.patchify_gather(x, ids, p) if channels_last else conv_order_gather(x, ids, p)
        gathered.backward(grad.double())
        assert torch.equal(ns.ops.scatter_patches(grad, ids, p, channels_last, c, h, w).double(), x.grad)


@pytest.mark.primitives("scatter_patches")
@pytest.mark.namespaces("mae_fast_emu", "mae_fast")  # the Triton scatter needs distinct ids (no atomics)
def test_scatter_patches_sums_repeated_ids(ns):
    imgs = torch.randn(2, 3, 8, 8)
    ids = torch.tensor([[1, 1, 2], [0, 3, 0]])
    grad = torch.randn(2, 3, 48)
    x = imgs.double().requires_grad_()
    reference.patchify_gather(x, ids, 4).backward(grad.double())
    scattered = ns.ops.scatter_patches(grad.to(ns.device), ids.to(ns.device), 4, True, 3, 8, 8)
    torch.testing.assert_close(scattered.double().cpu(), x.grad)


def _adjoint_dtype(ns) -> torch.dtype:
    """float64 where the kernels take it (Triton's gather), else float32 (the CUDA kernels)."""
    return torch.float64 if ns.triton else torch.float32


@pytest.mark.primitives("gather_patches", "scatter_patches")
@pytest.mark.filterwarnings(r"ignore:Input #\d+ requires gradient and is not a double precision")
def test_gather_gradcheck_and_double_backward(ns):
    """gather and scatter are adjoint custom ops: first and second derivatives (float32 steps where the
    kernels take no float64)."""
    dtype = _adjoint_dtype(ns)
    tolerances = {} if dtype == torch.float64 else {"eps": 1e-3, "atol": 1e-3, "rtol": 1e-3}
    imgs = torch.randn(1, 2, 8, 12, device=ns.device, dtype=dtype, requires_grad=True)
    ids = random_ids(1, 6, 3, ns.device)

    def fn(x):
        return ns.ops.gather_patches(x, ids, 4, True)

    assert torch.autograd.gradcheck(fn, (imgs,), fast_mode=True, **tolerances)
    assert torch.autograd.gradgradcheck(fn, (imgs,), fast_mode=True, **tolerances)


@pytest.mark.primitives("gather_patches", "scatter_patches")
@pytest.mark.parametrize("channels_last", [True, False])
def test_scatter_is_the_adjoint(ns, channels_last):
    """<gather(x), y> == <x, scatter(y)>, and scatter leaves the hidden patches at exactly zero."""
    b, c, h, w, p, k = 2, 3, 12, 8, 4, 3
    dtype = _adjoint_dtype(ns)
    imgs = torch.randn(b, c, h, w, device=ns.device, dtype=dtype)
    ids = random_ids(b, 6, k, ns.device)
    patches = torch.randn(b, k, p * p * c, device=ns.device, dtype=dtype)
    gathered = ns.ops.gather_patches(imgs, ids, p, channels_last)
    scattered = ns.ops.scatter_patches(patches, ids, p, channels_last, c, h, w)
    torch.testing.assert_close((gathered * patches).sum(), (imgs * scattered).sum())
    covered = ns.ops.scatter_patches(torch.ones_like(patches), ids, p, channels_last, c, h, w)
    assert torch.equal(scattered * (1 - covered), torch.zeros_like(scattered))
    assert covered.sum().item() == b * k * p * p * c


def _opcheck_cases(device):
    b, c, h, w, p, k = 2, 3, 8, 12, 4, 3
    ids = random_ids(b, 6, k, device)
    imgs = torch.randn(b, c, h, w, device=device, requires_grad=True)
    return {
        "patchify": ("patchify", (imgs, p)),
        "unpatchify": ("unpatchify", (torch.randn(b, 6, 48, device=device, requires_grad=True), p, 2, 3)),
        "gather_patches": ("gather_patches", (imgs, ids, p, True)),
        "gather_patches_conv_order": ("gather_patches", (imgs, ids, p, False)),
        "scatter_patches": (
            "scatter_patches",
            (torch.randn(b, k, p * p * c, device=device, requires_grad=True), ids, p, True, c, h, w),
        ),
    }


@pytest.mark.primitives("patchify", "unpatchify", "gather_patches", "scatter_patches")
@pytest.mark.parametrize(
    "case", ["patchify", "unpatchify", "gather_patches", "gather_patches_conv_order", "scatter_patches"]
)
def test_opcheck(ns, case):
    opcheck(ns, _opcheck_cases(ns.device), case)


@pytest.mark.primitives("gather_patches", "scatter_patches")
def test_torch_compile_fullgraph(ns):
    """The fake impls and the registered autograd let dynamo / AOTAutograd trace forward and backward in one
    graph (backend="aot_eager": inductor's CPU codegen around interpreter launches only costs time). The
    primitive itself: the public op checks index ranges on CPU tensors with a host sync."""
    imgs = torch.randn(2, 3, 8, 12, device=ns.device, requires_grad=True)
    ids = random_ids(2, 6, 3, ns.device)

    def step(imgs):
        return ns.ops.gather_patches(imgs, ids, 4, True).pow(3).sum() + ns.ops.gather_patches(imgs, ids, 4, False).sum()

    assert_compiles_like_eager(step, [imgs])


@pytest.mark.gpu
@pytest.mark.primitives("gather_patches", "scatter_patches")
@pytest.mark.namespaces("mae_fast_triton")  # one inductor build per op: the GPU stage has little time
def test_torch_compile_inductor_gpu(ns):
    """Inductor around the gather (the public op's dispatcher is not traced: see the test above)."""
    imgs = torch.randn(8, 3, 64, 48, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = random_ids(8, 12, 3, "cuda")

    def step(imgs):
        return ns.ops.gather_patches(imgs, ids, 16, True).float().pow(3).sum()

    assert_compiles_like_eager(step, [imgs], backend=None)


# --- the Triton kernels: ahead-of-time builds for the GPU ------------------------------------------------

INDEX_ARGS = ("num_visible", "grid_w", "stride_b", "stride_c", "stride_h", "stride_w")


def _gather_job(dtype, arch, kernel, conv_order=False):
    names = ("src_ptr", "ids_ptr", "imgs_ptr") if kernel == "_scatter_kernel" else ("imgs_ptr", "ids_ptr", "out_ptr")
    signature = dict(zip(names, (f"*{dtype}", "*i64", f"*{dtype}"), strict=True))
    signature.update(dict.fromkeys(INDEX_ARGS, "i32"))
    block_pix, block_c = gather_kernel.block_sizes(16, 3)
    constexprs = {"P": 16, "C": 3, "CONV_ORDER": conv_order, "BLOCK_PIX": block_pix, "BLOCK_C": block_c}
    return "mae_fast.kernels.patchify_gather", kernel, signature, constexprs, arch, 4, 3


def aot_jobs():
    """The gather / scatter launchers' default configs at ViT-B/16 sizes (p = 16, C = 3)."""
    jobs = {
        "gather bf16": _gather_job("bf16", 90, "_gather_kernel"),
        "gather fp32": _gather_job("fp32", 80, "_gather_kernel"),
        "scatter bf16": _gather_job("bf16", 90, "_scatter_kernel"),
        "scatter fp32": _gather_job("fp32", 80, "_scatter_kernel"),
        "gather conv order bf16": _gather_job("bf16", 90, "_gather_kernel", conv_order=True),
        "scatter conv order fp32": _gather_job("fp32", 80, "_scatter_kernel", conv_order=True),
    }
    keys = ("module", "kernel", "signature", "constexprs", "arch", "num_warps", "num_stages")
    return [{"label": label, **dict(zip(keys, job, strict=True))} for label, job in jobs.items()]


register_aot_jobs("patchify", aot_jobs())


def test_triton_kernels_compile_for_sm90_and_sm80_without_spills():
    check_aot_builds("patchify")
