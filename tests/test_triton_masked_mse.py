"""The Triton masked_mse_loss (kernels/masked_mse.py) against the float64 reference.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest.py).
"""

import pytest
import torch
from mae_fast.kernels import masked_mse
from triton_aot import compile_reports

from mae_fast import dispatch, ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (batch, channels, patch, grid_h, grid_w): p = 14 / 8 / 4 / 16, C = 1 and 3, batch 1, non-square grids,
# B * L not a multiple of the forward's BLOCK_M
SHAPES = [(1, 3, 14, 1, 2), (2, 1, 8, 3, 2), (2, 3, 4, 3, 5), (3, 3, 8, 5, 7), (1, 3, 16, 2, 3)]


def _inputs(batch, channels, p, grid_h, grid_w, dtype, device, imgs_dtype=torch.float32):
    imgs = (torch.randn(batch, channels, grid_h * p, grid_w * p, device=device) * 2 + 0.5).to(imgs_dtype)
    pred = torch.randn(batch, grid_h * grid_w, p * p * channels, device=device).to(dtype)
    mask = (torch.rand(batch, grid_h * grid_w, device=device) < 0.75).float()
    mask[0, 0] = 1.0  # at least one removed patch
    return pred, imgs, mask


def _exact(pred, imgs, mask, p, norm_pix, grad_loss=1.0):
    """Loss and d(grad_loss * loss)/d pred in float64 for exactly these (rounded) input values."""
    pred64 = pred.detach().double().requires_grad_()
    loss = reference.masked_mse_loss(pred64, imgs.double(), mask.double(), p, norm_pix)
    (grad,) = torch.autograd.grad(loss * grad_loss, pred64)
    return loss, grad


def _assert_grad_close(grad, exact):
    """Within one ulp of pred's dtype per value (the kernel rounds the residual, then the gradient).

    fp32 arithmetic (normalising the target) bounds the rest; fp16 gradients this small are subnormal,
    where one ulp is finfo.smallest_normal * eps.
    """
    info = torch.finfo(grad.dtype)
    atol = max(1e-5 * exact.abs().max().item(), info.smallest_normal * info.eps)
    torch.testing.assert_close(grad.double(), exact, rtol=max(info.eps, 1e-5), atol=atol)


def _poisoned_buffers(pred):
    buffers = masked_mse.forward_buffers(pred)
    for value in buffers.values():
        value.fill_(float("nan"))
    return buffers


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw_pix"])
def test_forward_and_grad_match_float64_reference(shape, dtype, norm_pix, device):
    p = shape[2]
    pred, imgs, mask = _inputs(*shape, dtype, device)
    exact_loss, exact_grad = _exact(pred, imgs, mask, p, norm_pix)

    buffers = _poisoned_buffers(pred)
    masked_mse.forward_into(pred, imgs, mask, p, norm_pix, 1e-6, **buffers)
    assert buffers["loss"].dtype == torch.float32 and buffers["loss"].dim() == 0
    torch.testing.assert_close(buffers["loss"].double(), exact_loss, rtol=2e-5, atol=0)
    assert buffers["mask_sum"].item() == mask.sum().item()

    grad = torch.full_like(pred, float("nan"))
    masked_mse.backward_into(torch.ones((), device=device), buffers["residual"], buffers["mask_sum"], grad)
    _assert_grad_close(grad, exact_grad)


@pytest.mark.parametrize("imgs_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_images(imgs_dtype, device):
    pred, imgs, mask = _inputs(2, 3, 4, 3, 2, torch.bfloat16, device, imgs_dtype)
    exact_loss, exact_grad = _exact(pred, imgs, mask, 4, True)
    loss_pred = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(loss_pred, imgs, mask, 4, backend="triton")
    loss.backward()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=0)
    _assert_grad_close(loss_pred.grad, exact_grad)


@pytest.mark.parametrize("removed", ["one", "all_but_one", "all"])
def test_extreme_masks_and_upstream_gradient(removed, device):
    """K = L - 1 kept (one patch removed), K = 1 kept, nothing kept; the backward scales by grad_loss."""
    pred, imgs, mask = _inputs(2, 3, 4, 2, 3, torch.float32, device)
    mask = torch.zeros_like(mask) if removed == "one" else torch.ones_like(mask)
    if removed == "one":
        mask[1, 4] = 1.0
    elif removed == "all_but_one":
        mask[0, 2] = 0.0
    exact_loss, exact_grad = _exact(pred, imgs, mask, 4, True, grad_loss=-3.5)
    leaf = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(leaf, imgs, mask, 4, backend="triton")
    (loss * -3.5).backward()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=0)
    _assert_grad_close(leaf.grad, exact_grad)


@pytest.mark.parametrize("mask_kind", ["bool", "weights", "float16"])
def test_mask_dtypes_and_fractional_weights(mask_kind, device):
    pred, imgs, mask = _inputs(2, 1, 8, 2, 2, torch.float32, device)
    if mask_kind == "bool":
        mask = mask.bool()
    elif mask_kind == "weights":
        mask = mask * torch.rand_like(mask) + mask  # weights in [1, 2) on the removed patches, 0 elsewhere
    else:
        mask = mask.half()
    exact_loss, exact_grad = _exact(pred, imgs, mask, 8, True)
    leaf = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(leaf, imgs, mask, 8, backend="triton")
    loss.backward()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=0)
    _assert_grad_close(leaf.grad, exact_grad)


def test_non_contiguous_inputs(device):
    b, c, p, gh, gw = 2, 3, 4, 3, 2
    pred_t = torch.randn(b, p * p * c, gh * gw, device=device)
    pred = pred_t.transpose(1, 2)  # [B, L, N] with stride 1 on L
    imgs = torch.randn(b, c, gh * p, gw * p, device=device).to(memory_format=torch.channels_last)
    mask = (torch.rand(gh * gw, b, device=device) < 0.6).float().t()
    mask[0, 1] = 1.0
    exact_loss, exact_grad = _exact(pred, imgs, mask, p, True)
    leaf = pred.detach().requires_grad_()
    loss = ops.masked_mse_loss(leaf, imgs, mask, p, backend="triton")
    loss.backward()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=0)
    _assert_grad_close(leaf.grad, exact_grad)


def test_no_grad_loss_stores_no_residual(device):
    pred, imgs, mask = _inputs(2, 3, 4, 2, 3, torch.float16, device)
    buffers = _poisoned_buffers(pred)
    buffers["residual"] = masked_mse.forward_buffers(pred, store_residual=False)["residual"]
    masked_mse.forward_into(pred, imgs, mask, 4, True, 1e-6, **buffers)
    assert buffers["residual"].shape == (0,)
    exact_loss, _ = _exact(pred, imgs, mask, 4, True)
    torch.testing.assert_close(buffers["loss"].double(), exact_loss, rtol=2e-5, atol=0)
    with torch.no_grad():
        loss = ops.masked_mse_loss(pred.requires_grad_(), imgs, mask, 4, backend="triton")
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=0)


def test_kept_patches_are_not_read(device):
    """Patches with mask 0 contribute nothing and are never loaded: NaN there does not reach the loss."""
    pred, imgs, mask = _inputs(1, 3, 4, 2, 2, torch.float32, device)
    mask[0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    exact_loss, exact_grad = _exact(pred, imgs, mask, 4, True)
    pred[0, 1] = float("nan")
    imgs[0, :, 0:4, 4:8] = float("inf")  # pixels of patch 1
    leaf = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(leaf, imgs, mask, 4, backend="triton")
    loss.backward()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=0)
    assert torch.equal(leaf.grad[0, 1], torch.zeros_like(leaf.grad[0, 1]))
    _assert_grad_close(leaf.grad, exact_grad)


def test_imgs_requiring_grad_go_to_the_reference(device):
    pred, imgs, mask = _inputs(1, 3, 4, 2, 2, torch.float32, device)
    imgs.requires_grad_()
    reason = dispatch.explain("masked_mse_loss", pred, imgs, mask, 4, True, 1e-6)["triton"]
    assert "requires grad" in reason
    with pytest.raises(dispatch.BackendError, match="requires grad"):
        ops.masked_mse_loss(pred, imgs, mask, 4, backend="triton")
    with pytest.raises(RuntimeError, match="no gradient for imgs"):
        torch.ops.mae_fast_triton.masked_mse_loss(pred, imgs, mask, 4, True, 1e-6, True)[0].backward()


def test_float64_and_huge_patches_are_left_to_the_reference(device):
    pred, imgs, mask = _inputs(1, 1, 4, 1, 2, torch.float64, device)
    assert "float64" in dispatch.explain("masked_mse_loss", pred, imgs, mask, 4, True, 1e-6)["triton"]
    p = 53  # 53 * 53 * 3 values: more than one program holds
    pred, imgs, mask = _inputs(1, 3, p, 1, 1, torch.float32, device)
    assert pred.shape[-1] > masked_mse.MAX_PATCH_VALUES
    assert "exceed" in dispatch.explain("masked_mse_loss", pred, imgs, mask, p, True, 1e-6)["triton"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda pred, imgs, mask: (pred[:, :-1], imgs, mask), "pred must have shape"),
        (lambda pred, imgs, mask: (pred, imgs, mask[:1]), "mask must have shape"),
        (lambda pred, imgs, mask: (pred.long(), imgs, mask), "pred must have dtype"),
        (lambda pred, imgs, mask: (pred, imgs[..., :-1], mask), "divisible by patch_size"),
        (lambda pred, imgs, mask: (pred, imgs, mask.to("meta")), "one device"),
        (lambda pred, imgs, mask: (pred, imgs, mask[0]), "mask must have 2 dimensions"),
    ],
    ids=["pred_shape", "mask_shape", "pred_dtype", "patch_divides", "devices", "mask_ndim"],
)
def test_bad_input_is_a_clear_error(change, message, device):
    pred, imgs, mask = change(*_inputs(2, 3, 4, 2, 2, torch.float32, device))
    with pytest.raises(ValueError, match=message):
        ops.masked_mse_loss(pred, imgs, mask, 4, backend="triton")


def test_bad_scalars_are_a_clear_error(device):
    pred, imgs, mask = _inputs(1, 1, 4, 1, 2, torch.float32, device)
    with pytest.raises(ValueError, match="eps must be positive"):
        ops.masked_mse_loss(pred, imgs, mask, 4, eps=0.0, backend="triton")
    pred1, imgs1, mask1 = _inputs(1, 1, 1, 2, 2, torch.float32, device)
    with pytest.raises(ValueError, match="at least 2 values per patch"):
        ops.masked_mse_loss(pred1, imgs1, mask1, 1, backend="triton")


def test_opcheck(device):
    pred, imgs, mask = _inputs(2, 3, 4, 2, 3, torch.float32, device)
    pred.requires_grad_()
    op = torch.ops.mae_fast_triton.masked_mse_loss.default
    torch.library.opcheck(op, (pred, imgs, mask, 4, True, 1e-6, True))
    torch.library.opcheck(op, (pred.detach(), imgs, mask, 4, True, 1e-6, False))
    loss, residual, mask_sum = op(pred.detach(), imgs, mask, 4, False, 1e-6, True)
    grad_loss = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.mae_fast_triton.masked_mse_loss_backward.default, (grad_loss, residual, mask_sum))


def test_torch_compile_fullgraph(device):
    """Fake impls + registered autograd let dynamo/AOTAutograd trace the forward and backward custom ops.

    On the CPU: backend="aot_eager" (inductor's CPU codegen around interpreter launches only costs time)
    and the custom op itself: the public op's dispatcher also runs the other backends' checks, whose
    tracing is not this kernel's concern (the GPU test below compiles the public op with inductor).
    """
    pred, imgs, mask = _inputs(2, 3, 4, 2, 3, torch.bfloat16, device)

    def step(pred, imgs, mask):
        return masked_mse.masked_mse_loss(pred, imgs, mask, 4, True, 1e-6) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaf = pred.clone().requires_grad_()
    loss = compiled(leaf, imgs, mask)
    loss.backward()
    exact_loss, exact_grad = _exact(pred, imgs, mask, 4, True, grad_loss=2.0)
    torch.testing.assert_close(loss.double(), 2.0 * exact_loss, rtol=2e-5, atol=0)
    _assert_grad_close(leaf.grad, exact_grad)


@pytest.mark.gpu
def test_torch_compile_inductor_public_op_gpu():
    pred, imgs, mask = _inputs(4, 3, 16, 4, 6, torch.bfloat16, torch.device("cuda"))

    def step(pred):
        return ops.masked_mse_loss(pred, imgs, mask, 16, backend="triton") * 2.0

    torch._dynamo.reset()
    leaf = pred.clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True)(leaf)
    loss.backward()
    exact_loss, exact_grad = _exact(pred, imgs, mask, 16, True, grad_loss=2.0)
    torch.testing.assert_close(loss.double(), 2.0 * exact_loss, rtol=2e-5, atol=0)
    _assert_grad_close(leaf.grad, exact_grad)


# Contiguous inputs: Triton specialises the unit strides (stride_pn, stride_iw, stride_ml) as constants.
UNIT_STRIDES = {"stride_pn": 1, "stride_iw": 1, "stride_ml": 1}


def _forward_signature(pred_type, imgs_type):
    ints = ["num_rows", "num_patches", "grid_w", "num_programs"] + [
        f"stride_{name}" for name in ("pb", "pl", "ib", "ic", "ih", "mb")
    ]
    signature = {"pred_ptr": pred_type, "imgs_ptr": imgs_type, "mask_ptr": "*fp32", "residual_ptr": pred_type}
    signature["partial_ptr"] = "*fp32"
    signature.update(dict.fromkeys(ints, "i32"))
    signature["eps"] = "fp32"
    constexprs = ["P", "C", "NORM_PIX", "BLOCK_M", "BLOCK_N", "STORE_RESIDUAL", "ROUND_BF16", *UNIT_STRIDES]
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    return signature


AOT_ARCHS = (90, 80)
AOT_PATCHES = (16, 14, 8)


def _aot_jobs():
    jobs = []
    for arch in AOT_ARCHS:
        for patch in AOT_PATCHES:
            values = patch * patch * 3
            block_m, block_n, num_warps = masked_mse.forward_config(values)
            constexprs = {"P": patch, "C": 3, "NORM_PIX": True, "BLOCK_M": block_m, "BLOCK_N": block_n}
            jobs.append(
                aot_job(
                    "_masked_mse_forward_kernel",
                    _forward_signature("*bf16", "*fp32"),
                    constexprs | {"STORE_RESIDUAL": True, "ROUND_BF16": False} | UNIT_STRIDES,
                    arch,
                    num_warps,
                    f"p={patch}",
                )
            )
        backward_signature = {"residual_ptr": "*bf16", "grad_loss_ptr": "*fp32", "mask_sum_ptr": "*fp32"}
        backward_signature |= {"grad_pred_ptr": "*bf16", "numel": "i32"}
        backward_signature |= dict.fromkeys(["N", "BLOCK", "ROUND_BF16"], "constexpr")
        backward_constexprs = {"N": 768, "BLOCK": masked_mse._BACKWARD_BLOCK, "ROUND_BF16": False}
        jobs.append(aot_job("_masked_mse_backward_kernel", backward_signature, backward_constexprs, arch, 4, ""))
        finalize_signature = {"partial_ptr": "*fp32", "loss_ptr": "*fp32", "mask_sum_ptr": "*fp32"}
        finalize_signature |= {"num_programs": "i32", "BLOCK": "constexpr"}
        jobs.append(
            aot_job(
                "_masked_mse_finalize_kernel", finalize_signature, {"BLOCK": masked_mse._FINALIZE_BLOCK}, arch, 4, ""
            )
        )
    return jobs


def aot_job(kernel, signature, constexprs, arch, num_warps, label):
    return {
        "module": "mae_fast.kernels.masked_mse",
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "arch": arch,
        "num_warps": num_warps,
        "label": label,
    }


def test_aot_compiles_for_sm90_and_sm80_without_spills():
    reports = compile_reports(_aot_jobs())
    assert {report["arch"] for report in reports} == set(AOT_ARCHS)
    assert len(reports) == len(AOT_ARCHS) * (len(AOT_PATCHES) + 2)
    for report in reports:
        print(f"{report['label']} {report['text']}")
    assert all(report["spills"] == 0 for report in reports), [r["text"] for r in reports if r["spills"]]


def test_finalize_sums_more_partials_than_one_block(device):
    """Batches with more programs than the finalize block: the fixed-order loop over the partials."""
    programs = 2 * masked_mse._FINALIZE_BLOCK + 37
    partials = torch.rand(2, programs, device=device)
    loss = torch.full((), float("nan"), device=device)
    mask_sum = torch.full((), float("nan"), device=device)
    masked_mse._masked_mse_finalize_kernel[(1,)](partials, loss, mask_sum, programs, BLOCK=masked_mse._FINALIZE_BLOCK)
    exact = partials.double().sum(dim=1)
    torch.testing.assert_close(mask_sum.double(), exact[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.double(), exact[0] / exact[1], rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_mae_base_shape_and_determinism(dtype):
    pred, imgs, mask = _inputs(16, 3, 16, 14, 14, dtype, torch.device("cuda"))
    exact_loss, exact_grad = _exact(pred, imgs, mask, 16, True)
    leaf = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(leaf, imgs, mask, 16, backend="triton")
    loss.backward()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=0)
    _assert_grad_close(leaf.grad, exact_grad)
    again = ops.masked_mse_loss(pred, imgs, mask, 16, backend="triton")
    assert torch.equal(loss.detach(), again), "the reduction must give the same bits on every run"
