"""patch_embed_gather on every backend, and its primitives (patch_embed_gather, patch_embed_pos_grad) on every
namespace, against the float64 reference.

Arithmetic results follow the same-precision rule (cases.assert_close_to_exact): the error against float64
of the same rounded inputs is at most twice that of the reference computed in the kernel's own dtype, plus
a small floor. The Triton kernels' outputs start as NaN here (MAE_FAST_POISON_OUTPUTS).
"""

from __future__ import annotations

import pytest
import torch
from cases import (
    FLOAT_DTYPES,
    TOL,
    against_reference,
    as_float64,
    assert_close_scaled,
    assert_close_to_exact,
    assert_compiles_like_eager,
    check_aot_builds,
    grads_of,
    model_matches_reference,
    opcheck,
    randn,
    random_ids,
    register_aot_jobs,
)
from mae_fast.kernels import patch_embed as patch_embed_kernel
from mae_fast.kernels import patchify_gather as gather_kernel

from mae_fast import dispatch, ops, reference

# (B, C, H, W, p, D, K): L = 1 = K; p = 14, E = 588 (not a BLOCK_K multiple), K = L; D = 136 > BLOCK_N;
# then vector-path gathers (p % 4 == 0, C = 3), C = 1 with p = 7, a 16-pixel patch with D = 96
EMBED_SHAPES = [
    (1, 1, 8, 8, 8, 16, 1),
    (2, 3, 28, 42, 14, 24, 6),
    (2, 3, 16, 40, 8, 136, 5),
    (2, 3, 32, 32, 8, 64, 5),
    (3, 1, 28, 28, 7, 32, 4),
    (2, 3, 64, 48, 16, 96, 12),
]
NAMES = ("imgs", "ids", "weight", "bias", "pos_embed")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv(gather_kernel.POISON_ENV, "1")


def embed_inputs(device, shape, dtype, pos_layout="3d", with_bias=True):
    """imgs, ids_keep, weight, bias and pos_embed (float32, as the model's table) for ``shape``."""
    b, c, h, w, p, d, k = shape
    num_patches = (h // p) * (w // p)
    imgs = randn(b, c, h, w, device=device, dtype=dtype)
    ids = random_ids(b, num_patches, k, device)
    weight = (torch.randn(d, c, p, p, device=device) / (c * p * p) ** 0.5).to(dtype)
    bias = randn(d, device=device, dtype=dtype) if with_bias else None
    pos = {"none": None, "2d": torch.randn(num_patches, d), "3d": torch.randn(1, num_patches, d)}[pos_layout]
    return imgs, ids, weight, bias, None if pos is None else pos.to(device)


def check_embed(backend: str, inputs, dtype):
    """Forward and every gradient of the public op on ``backend`` by the same-precision rule."""
    imgs, ids, weight, bias, pos = inputs
    grad_out = randn(imgs.shape[0], ids.shape[1], weight.shape[0], device=imgs.device, dtype=dtype)
    public = lambda *a: ops.patch_embed_gather(*a, backend=backend)  # noqa: E731
    (out, grads), (same, same_grads), (exact, exact_grads) = against_reference(
        public, reference.patch_embed_gather, inputs, grad_out
    )
    assert_close_to_exact(out, same, exact, "out")
    for name, grad, same_grad, exact_grad in zip(NAMES, grads, same_grads, exact_grads, strict=True):
        if exact_grad is None:
            assert grad is None, name
        else:
            assert_close_to_exact(grad, same_grad, exact_grad, f"grad of {name}")


# --- the public op, on every backend ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", EMBED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_bias_pos", [True, False], ids=["bias_pos", "bare"])
def test_patch_embed_gather_forward_backward(backend, shape, dtype, with_bias_pos):
    pos_layout = "3d" if with_bias_pos else "none"
    check_embed(backend.name, embed_inputs(backend.device, shape, dtype, pos_layout, with_bias_pos), dtype)


@pytest.mark.parametrize("pos_layout,with_bias", [("none", True), ("2d", False)])
def test_patch_embed_gather_optional_inputs(backend, pos_layout, with_bias):
    inputs = embed_inputs(backend.device, (2, 3, 16, 24, 8, 24, 4), torch.float32, pos_layout, with_bias)
    check_embed(backend.name, inputs, torch.float32)


def test_patch_embed_gather_non_contiguous(backend):
    imgs, ids, weight, bias, pos = embed_inputs(backend.device, (2, 3, 16, 24, 8, 24, 4), torch.float32)
    imgs = imgs.to(memory_format=torch.channels_last)
    weight = weight.transpose(2, 3).contiguous().transpose(2, 3)
    assert not imgs.is_contiguous() and not weight.is_contiguous()
    check_embed(backend.name, (imgs, ids, weight, bias, pos), torch.float32)


@pytest.mark.backends("triton", "cuda")
@pytest.mark.parametrize("shape", [(2, 3, 16, 24, 8, 24, 4), (2, 3, 32, 32, 8, 64, 5)], ids=str)
def test_patch_embed_gather_under_autocast(backend, shape):
    """As the release's conv under bf16 autocast (what training runs): the GEMM in bf16, the reference
    backend's bf16 output by the same-precision rule, and fp32 gradients for the fp32 image and parameters."""
    inputs = embed_inputs(backend.device, shape, torch.float32)
    imgs, ids, weight, bias, pos = inputs
    grad_out = randn(shape[0], shape[6], shape[5], device=backend.device, dtype=torch.bfloat16)
    results = {}
    for name in (backend.name, "reference"):
        with torch.autocast(backend.device.type, dtype=torch.bfloat16):
            results[name] = grads_of(lambda *a, b=name: ops.patch_embed_gather(*a, backend=b), inputs, grad_out)
    (out, grads), (same, same_grads) = results[backend.name], results["reference"]
    assert out.dtype == same.dtype == torch.bfloat16
    as64 = [imgs.bfloat16().double(), ids, weight.bfloat16().double(), bias.bfloat16().double(), pos.double()]
    exact, exact_grads = grads_of(reference.patch_embed_gather, as64, grad_out.double())
    assert_close_to_exact(out, same, exact, "out")
    tol = TOL[torch.bfloat16] * 2
    torch.testing.assert_close(out.float(), same.float(), rtol=tol, atol=tol)
    for index, name in ((0, "imgs"), (2, "weight"), (3, "bias"), (4, "pos_embed")):
        assert grads[index].dtype == torch.float32, name
        assert_close_to_exact(grads[index].bfloat16(), same_grads[index].bfloat16(), exact_grads[index], name)
        scale = same_grads[index].abs().max().item() + 1e-6
        torch.testing.assert_close(grads[index] / scale, same_grads[index] / scale, rtol=tol, atol=tol)


def test_int32_ids_give_the_same_results(backend):
    imgs, ids, weight, bias, pos = embed_inputs(backend.device, (2, 3, 16, 24, 8, 24, 4), torch.float32)
    embed = [ops.patch_embed_gather(imgs, i, weight, bias, pos, backend=backend.name) for i in (ids, ids.int())]
    assert torch.equal(*embed)


@pytest.mark.backends("triton", "cuda")
def test_model_matches_reference(backend, monkeypatch):
    """The tiny MAE with patch_embed_gather on this backend (every other op on the reference: the loss's
    norm_pix only changes the gradient reaching this op, and test_unshuffle.py's model test takes the other)."""
    model_matches_reference(monkeypatch, backend, {"patch_embed_gather"}, norm_pix_loss=True)


def test_bad_input_is_a_clear_error(backend, monkeypatch):
    imgs, ids, weight, bias, pos = embed_inputs(backend.device, (2, 3, 16, 24, 8, 24, 4), torch.float32)
    name = backend.name
    cases = [
        (lambda: ops.patch_embed_gather(imgs, ids.double(), weight, bias, pos, backend=name), "ids_keep must"),
        (lambda: ops.patch_embed_gather(imgs[:1], ids, weight, bias, pos, backend=name), "ids_keep batch size"),
        (lambda: ops.patch_embed_gather(imgs[..., :20], ids, weight, bias, pos, backend=name), "divisible"),
        (lambda: ops.patch_embed_gather(imgs, ids, weight, bias.to("meta"), pos, backend=name), "bias on meta"),
        (lambda: ops.patch_embed_gather(imgs, ids, weight, bias, pos[:, :5], backend=name), "pos_embed must"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    monkeypatch.setenv("MAE_FAST_CHECK_INDICES", "1")  # index values are read on the host: on a GPU when asked
    with pytest.raises(ValueError, match="ids_keep values"):
        ops.patch_embed_gather(imgs, ids + 6, weight, bias, pos, backend=name)


@pytest.mark.backends("triton", "cuda")
def test_refusals_name_the_reason(backend, monkeypatch):
    """float64 and mixed dtypes outside autocast are refused by both kernels; repeated ids by Triton's."""
    monkeypatch.setenv("MAE_FAST_CHECK_INDICES", "1")  # the distinct-ids check reads the ids on the host
    imgs, ids, weight, bias, pos = embed_inputs(backend.device, (1, 3, 8, 8, 8, 16, 1), torch.float32)
    with pytest.raises(dispatch.BackendError, match="imgs is float64"):
        ops.patch_embed_gather(imgs.double(), ids, weight.double(), bias.double(), pos, backend=backend.name)
    with pytest.raises(dispatch.BackendError, match="weight is torch.float16 but imgs is torch.float32"):
        ops.patch_embed_gather(imgs, ids, weight.half(), bias, pos, backend=backend.name)
    if backend.name == "triton":
        repeated = torch.tensor([[0]], device=backend.device).expand(1, 2)
        imgs = torch.randn(1, 3, 16, 8, device=backend.device)
        with pytest.raises(dispatch.BackendError, match="distinct ids"):
            ops.patch_embed_gather(imgs, repeated, weight, backend="triton")


@pytest.mark.gpu
@pytest.mark.backends("triton", "cuda")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_release_sized_shapes_gpu(backend, dtype):
    """ViT-B/16 at 224 px, mask 0.75 (K = 49 of 196)."""
    check_embed(backend.name, embed_inputs(backend.device, (16, 3, 224, 224, 16, 768, 49), dtype), dtype)


# --- the primitives, on every namespace ------------------------------------------------------------------


@pytest.mark.primitives("patch_embed_gather")
@pytest.mark.parametrize("shape", [(2, 3, 16, 16, 8, 3, 32), (1, 1, 14, 14, 7, 2, 24)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_bias_pos", [True, False], ids=["bias_pos", "bare"])
def test_patch_embed_gather_primitive(ns, shape, dtype, with_bias_pos):
    """The forward primitive alone (B, C, H, W, p, K, D): imgs' dtype and shape, within the dtype's tolerance."""
    b, c, h, w, p, keep, dim = shape
    length = (h // p) * (w // p)
    imgs = randn(b, c, h, w, device=ns.device, dtype=dtype)
    weight = (torch.randn(dim, c, p, p, device=ns.device) * 0.1).to(dtype)
    bias = randn(dim, device=ns.device, dtype=dtype) if with_bias_pos else None
    pos = randn(1, length, dim, device=ns.device, dtype=dtype) if with_bias_pos else None
    ids = random_ids(b, length, keep, ns.device)
    out = ns.ops.patch_embed_gather(imgs, ids, weight, bias, pos)
    exact = reference.patch_embed_gather(*as_float64((imgs, ids, weight, bias, pos)))
    assert out.dtype == dtype and out.shape == exact.shape
    assert_close_scaled(out, exact, dtype, "patch_embed_gather")


@pytest.mark.primitives("patch_embed_gather", "patch_embed_pos_grad", "gather_patches", "scatter_patches")
def test_patch_embed_gather_gradients_through_the_autograd_formula(ns):
    imgs, weight = torch.randn(2, 3, 16, 12), torch.randn(24, 3, 4, 4) * 0.1
    bias, pos, ids = torch.randn(24), torch.randn(1, 12, 24), random_ids(2, 12, 5)
    leaves = [t.to(ns.device, copy=True).requires_grad_() for t in (imgs, weight, bias, pos)]
    exact_leaves = [t.double().requires_grad_() for t in (imgs, weight, bias, pos)]
    grad = torch.randn(2, 5, 24)
    ns.ops.patch_embed_gather(leaves[0], ids.to(ns.device), *leaves[1:]).backward(grad.to(ns.device))
    reference.patch_embed_gather(exact_leaves[0], ids, *exact_leaves[1:]).backward(grad.double())
    for name, mine, exact in zip(("imgs", "weight", "bias", "pos_embed"), leaves, exact_leaves, strict=True):
        assert_close_scaled(mine.grad.cpu(), exact.grad, torch.float32, f"grad {name}")


@pytest.mark.primitives("patch_embed_pos_grad")
def test_patch_embed_pos_grad(ns):
    """Rows share table positions: the per-row sum over the batch, bit-identical run to run in every
    namespace (no atomics over the batch: the CUDA backend adds per image, then sums the batch)."""
    grad = torch.randn(5, 7, 40, device=ns.device)
    ids = random_ids(5, 9, 7, ns.device)
    first = ns.ops.patch_embed_pos_grad(grad, ids, 9)
    expected = torch.zeros(9, 40, dtype=torch.float64, device=ns.device).index_add_(
        0, ids.flatten(), grad.double().flatten(0, 1)
    )
    torch.testing.assert_close(first.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(first, ns.ops.patch_embed_pos_grad(grad, ids, 9))


@pytest.mark.primitives("patch_embed_pos_grad")
@pytest.mark.namespaces("mae_fast_emu", "mae_fast")  # the Triton kernel needs distinct ids (no atomics)
def test_patch_embed_pos_grad_sums_repeated_ids(ns):
    grad = torch.randn(2, 4, 8, device=ns.device)
    ids = torch.tensor([[3, 3, 0, 3], [1, 0, 1, 2]], device=ns.device)
    expected = torch.zeros(5, 8, dtype=torch.float64, device=ns.device).index_add_(
        0, ids.flatten(), grad.double().flatten(0, 1)
    )
    torch.testing.assert_close(ns.ops.patch_embed_pos_grad(grad, ids, 5).double(), expected, rtol=1e-6, atol=1e-6)


def _opcheck_cases(device):
    imgs, ids, weight, bias, pos = embed_inputs(device, (2, 3, 8, 12, 4, 24, 3), torch.float32)
    imgs, weight, bias, pos = (t.requires_grad_() for t in (imgs, weight, bias, pos))
    return {
        "patch_embed_gather": ("patch_embed_gather", (imgs, ids, weight, bias, pos)),
        "patch_embed_gather_no_bias_pos": ("patch_embed_gather", (imgs, ids, weight, None, None)),
        "patch_embed_pos_grad": ("patch_embed_pos_grad", (torch.randn(2, 3, 24, device=device), ids, 6)),
    }


@pytest.mark.primitives("patch_embed_gather", "patch_embed_pos_grad")
@pytest.mark.parametrize("case", ["patch_embed_gather", "patch_embed_gather_no_bias_pos", "patch_embed_pos_grad"])
def test_opcheck(ns, case):
    opcheck(ns, _opcheck_cases(ns.device), case)


@pytest.mark.primitives("patch_embed_gather", "patch_embed_pos_grad")
def test_torch_compile_fullgraph(ns):
    """Forward and the gradients of imgs, weight and the table in one traced graph (aot_eager)."""
    imgs, ids, weight, bias, pos = embed_inputs(ns.device, (2, 3, 8, 12, 4, 24, 3), torch.float32)

    def step(imgs, weight, pos):
        return ns.ops.patch_embed_gather(imgs, ids, weight, bias, pos).square().sum()

    assert_compiles_like_eager(step, [t.requires_grad_() for t in (imgs, weight, pos)])


@pytest.mark.gpu
@pytest.mark.primitives("patch_embed_gather", "patch_embed_pos_grad")
@pytest.mark.namespaces("mae_fast_triton")  # one inductor build per op: the GPU stage has little time
def test_torch_compile_inductor_gpu(ns):
    """Inductor around the primitive (the public op's dispatcher is not traced: see the test above)."""
    imgs, ids, weight, bias, pos = embed_inputs(ns.device, (8, 3, 64, 48, 16, 192, 3), torch.bfloat16)

    def step(imgs, weight):
        return ns.ops.patch_embed_gather(imgs, ids, weight, bias, pos).float().square().sum()

    assert_compiles_like_eager(step, [t.requires_grad_() for t in (imgs, weight)], backend=None)


# --- the Triton kernels: ahead-of-time builds for the GPU ------------------------------------------------

INDEX_ARGS = ("num_visible", "grid_w", "stride_b", "stride_c", "stride_h", "stride_w")


def _embed_job(dtype, arch, patch):
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    names = ("imgs_ptr", "ids_ptr", "w_ptr", "bias_ptr", "pos_ptr", "out_ptr")
    types = (f"*{dtype}", "*i64", f"*{dtype}", f"*{dtype}", "*fp32", f"*{dtype}")
    signature = dict(zip(names, types, strict=True))
    signature.update(dict.fromkeys(("M", "N") + INDEX_ARGS, "i32"))
    constexprs = {
        "P": patch, "C": 3, "HAS_BIAS": True, "HAS_POS": True, "UPCAST": False,
        "PRECISION": patch_embed_kernel.dot_precision(torch_dtype), "BLOCK_M": patch_embed_kernel.BLOCK_M,
        "BLOCK_N": patch_embed_kernel.block_n(768), "BLOCK_K": patch_embed_kernel.block_k(torch_dtype),
    }  # fmt: skip
    warps, stages = patch_embed_kernel.NUM_WARPS, patch_embed_kernel.NUM_STAGES
    return "mae_fast.kernels.patch_embed", "_patch_embed_kernel", signature, constexprs, arch, warps, stages


def _pos_grad_job(dtype, arch):
    signature = {"grad_ptr": f"*{dtype}", "inv_ptr": "*i32", "out_ptr": "*fp32"}
    signature.update(dict.fromkeys(("batch", "num_visible", "L", "N"), "i32"))
    constexprs = {"BLOCK_L": 16, "BLOCK_N": patch_embed_kernel.block_n(768)}
    return "mae_fast.kernels.patch_embed", "_pos_grad_kernel", signature, constexprs, arch, 4, 3


def aot_jobs():
    """The launchers' default configs, at ViT-B/16 sizes (p = 16, C = 3, D = 768) and p = 14."""
    jobs = {
        "patch_embed bf16 p16 sm90": _embed_job("bf16", 90, 16),
        "patch_embed bf16 p16 sm80": _embed_job("bf16", 80, 16),
        "patch_embed fp16 p14": _embed_job("fp16", 90, 14),
        "patch_embed fp32 p14": _embed_job("fp32", 80, 14),
        "pos_grad bf16": _pos_grad_job("bf16", 90),
        "pos_grad fp32": _pos_grad_job("fp32", 80),
    }
    keys = ("module", "kernel", "signature", "constexprs", "arch", "num_warps", "num_stages")
    return [{"label": label, **dict(zip(keys, job, strict=True))} for label, job in jobs.items()]


register_aot_jobs("patch_embed", aot_jobs())


def test_triton_kernels_compile_for_sm90_and_sm80_without_spills():
    reports = check_aot_builds("patch_embed")
    half_gemms = [r for r in reports if r["label"].startswith("patch_embed") and "fp32" not in r["label"]]
    assert half_gemms and all(report["tensor_cores"] for report in half_gemms), [r["text"] for r in half_gemms]
