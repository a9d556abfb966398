"""masked_mse_loss on every backend, and its primitives (masked_mse_loss, masked_mse_loss_backward and the
in-place masked_mse_loss_backward_) on every namespace, against the float64 reference.

The compiled backends compute pred's gradient in the forward (``saved_grad``: the final gradient for an
upstream gradient of 1, or, for Triton's float16, the O(1) residual) and their backward scales it, in place
in eager mode. The gradient is held to one ulp of pred's dtype per value (two roundings at most).
"""

from __future__ import annotations

import pytest
import torch
from cases import (
    FLOAT_DTYPES,
    LOSS_SHAPES,
    assert_compiles_like_eager,
    check_aot_builds,
    refused,
    register_aot_jobs,
)
from mae_fast.kernels import masked_mse
from torch.utils._python_dispatch import TorchDispatchMode

from mae_fast import dispatch, ops, reference
from mae_fast.backends.cuda import loss as cuda_loss
from mae_fast.backends.triton import loss as triton_loss
from mae_fast.ops.loss import loss_and_saved_grad

NAMESPACE_OF = {"triton": "mae_fast_triton", "cuda": "mae_fast"}
MAX_PATCH_VALUES = {"triton": triton_loss.MAX_PATCH_VALUES, "cuda": cuda_loss.MAX_PATCH_VALUES}
UPSTREAM_GRADS = [1.0, 0.25, 3.0, 0.0]


def loss_inputs(batch, channels, p, grid_h, grid_w, dtype, device, imgs_dtype=torch.float32, far_mean=False):
    """pred, imgs and a mask removing about 3 patches in 4 (at least the first of the first image); with
    ``far_mean`` the pixels lie in [1, 5): a mean far from 0 tests the variance numerics."""
    shape = (batch, channels, grid_h * p, grid_w * p)
    imgs = torch.rand(shape, device=device) * 4 + 1 if far_mean else torch.randn(shape, device=device) * 2 + 0.5
    pred = torch.randn(batch, grid_h * grid_w, p * p * channels, device=device).to(dtype)
    mask = (torch.rand(batch, grid_h * grid_w, device=device) < 0.75).float()
    mask[0, 0] = 1.0
    return pred, imgs.to(imgs_dtype), mask


def grid_inputs(shape, dtype, device):
    """loss_inputs for a (B, C, H, W, p) of LOSS_SHAPES, pixels far from 0."""
    b, c, h, w, p = shape
    return loss_inputs(b, c, p, h // p, w // p, dtype, device, far_mean=True)


def exact_loss_and_grad(pred, imgs, mask, p, norm_pix, grad_loss=1.0):
    """Loss and d(grad_loss * loss)/d pred in float64 for exactly these (rounded) input values."""
    pred64 = pred.detach().double().requires_grad_()
    loss = reference.masked_mse_loss(pred64, imgs.double(), mask.double(), p, norm_pix)
    (grad,) = torch.autograd.grad(loss * grad_loss, pred64)
    return loss, grad


def assert_grad_close(grad, exact, ulps: float = 1.0):
    """Within ``ulps`` ulps of pred's dtype per value: one, as the kernels round at most twice (the saved
    gradient or fp16 residual, then the scaled gradient).

    fp32 arithmetic (normalising the target) bounds the rest; fp16 gradients this small are subnormal,
    where one ulp is finfo.smallest_normal * eps.
    """
    info = torch.finfo(grad.dtype)
    atol = max(1e-5 * exact.abs().max().item(), ulps * info.smallest_normal * info.eps)
    torch.testing.assert_close(grad.cpu().double(), exact.cpu(), rtol=ulps * max(info.eps, 1e-5), atol=atol)


def assert_loss_close(loss, exact):
    torch.testing.assert_close(loss.double(), exact, rtol=2e-5, atol=0)


# --- the public op, on every backend ---------------------------------------------------------------------


@pytest.mark.backends("reference", "cuda")
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw_pix"])
def test_masked_mse_loss_forward_backward(backend, shape, dtype, norm_pix):
    """The loss, pred's gradient for an upstream gradient of 3, a bitwise reproducible loss; on the CUDA
    backend also the Triton loss where Triton runs these inputs. (The Triton kernels run this grid in
    test_loss_primitives_and_the_backward_rules; its public op, the tests below.)"""
    p = shape[4]
    pred, imgs, mask = grid_inputs(shape, dtype, backend.device)
    exact_loss, exact_grad = exact_loss_and_grad(pred, imgs, mask, p, norm_pix, grad_loss=3.0)
    leaf = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(leaf, imgs, mask, p, norm_pix, backend=backend.name)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-6)
    (loss * 3).backward()
    assert_grad_close(leaf.grad, exact_grad)
    again = ops.masked_mse_loss(pred, imgs, mask, p, norm_pix, backend=backend.name)
    assert torch.equal(again, loss.detach()), "the loss must be bitwise reproducible"
    if backend.name == "cuda" and refused("triton", "masked_mse_loss", pred, imgs, mask, p, norm_pix, 1e-6) is None:
        triton = ops.masked_mse_loss(pred, imgs, mask, p, norm_pix, backend="triton")
        torch.testing.assert_close(loss.detach(), triton, rtol=1e-4, atol=1e-6)


def check_public_loss(backend: str, pred, imgs, mask, p, upstream=1.0):
    """The public op's loss and pred's gradient (for an upstream gradient ``upstream``) against float64."""
    exact_loss, exact_grad = exact_loss_and_grad(pred, imgs, mask, p, True, grad_loss=upstream)
    leaf = pred.detach().clone().requires_grad_()  # clone keeps pred's strides
    loss = ops.masked_mse_loss(leaf, imgs, mask, p, backend=backend)
    (loss if upstream == 1.0 else loss * upstream).backward()
    assert_loss_close(loss, exact_loss)
    assert_grad_close(leaf.grad, exact_grad)


@pytest.mark.parametrize("imgs_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_images(backend, imgs_dtype):
    pred, imgs, mask = loss_inputs(2, 3, 4, 3, 2, torch.bfloat16, backend.device, imgs_dtype)
    check_public_loss(backend.name, pred, imgs, mask, 4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("removed", ["one", "all_but_one", "all"])
def test_extreme_masks_and_upstream_gradient(backend, removed, dtype):
    """K = L - 1 kept (one patch removed), K = 1 kept, nothing kept; the backward scales by grad_loss."""
    pred, imgs, mask = loss_inputs(2, 3, 4, 2, 3, dtype, backend.device)
    mask = torch.zeros_like(mask) if removed == "one" else torch.ones_like(mask)
    if removed == "one":
        mask[1, 4] = 1.0
    elif removed == "all_but_one":
        mask[0, 2] = 0.0
    check_public_loss(backend.name, pred, imgs, mask, 4, upstream=-3.5)


@pytest.mark.parametrize("mask_kind", ["bool", "weights", "float16"])
def test_mask_dtypes_and_fractional_weights(backend, mask_kind):
    pred, imgs, mask = loss_inputs(2, 1, 8, 2, 2, torch.float32, backend.device)
    if mask_kind == "bool":
        mask = mask.bool()
    elif mask_kind == "weights":
        mask = mask * torch.rand_like(mask) + mask  # weights in [1, 2) on the removed patches, 0 elsewhere
    else:
        mask = mask.half()
    check_public_loss(backend.name, pred, imgs, mask, 8)


def test_non_contiguous_inputs(backend):
    b, c, p, gh, gw = 2, 3, 4, 3, 2
    device = backend.device
    pred = torch.randn(b, p * p * c, gh * gw, device=device).transpose(1, 2)  # [B, L, N] with stride 1 on L
    imgs = torch.randn(b, c, gh * p, gw * p, device=device).to(memory_format=torch.channels_last)
    mask = (torch.rand(gh * gw, b, device=device) < 0.6).float().t()
    mask[0, 1] = 1.0
    assert not pred.is_contiguous() and not mask.is_contiguous()
    check_public_loss(backend.name, pred, imgs, mask, p)


def test_no_grad_loss(backend):
    pred, imgs, mask = loss_inputs(2, 3, 4, 2, 3, torch.float16, backend.device)
    exact_loss, _ = exact_loss_and_grad(pred, imgs, mask, 4, True)
    with torch.no_grad():
        loss = ops.masked_mse_loss(pred.requires_grad_(), imgs, mask, 4, backend=backend.name)
    assert_loss_close(loss, exact_loss)


@pytest.mark.backends("triton", "cuda")
def test_loss_stores_a_gradient_only_when_pred_needs_one(backend):
    pred, imgs, mask = loss_inputs(1, 3, 4, 2, 2, torch.bfloat16, backend.device)
    primitive = getattr(torch.ops, NAMESPACE_OF[backend.name]).masked_mse_loss.default
    stored = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            outputs = func(*args, **(kwargs or {}))
            if func is primitive:
                stored.append(tuple(outputs[1].shape))
            return outputs

    with Recorder():
        ops.masked_mse_loss(pred, imgs, mask, 4, backend=backend.name)
        with torch.no_grad():
            ops.masked_mse_loss(pred.clone().requires_grad_(), imgs, mask, 4, backend=backend.name)
        ops.masked_mse_loss(pred.clone().requires_grad_(), imgs, mask, 4, backend=backend.name)
    assert stored == [(0,), (0,), tuple(pred.shape)]


@pytest.mark.backends("triton", "cuda")  # the reference reads every patch: NaN * 0 is NaN
def test_kept_patches_are_not_read(backend):
    """Patches with mask 0 contribute nothing and are never loaded: NaN there does not reach the loss."""
    pred, imgs, mask = loss_inputs(1, 3, 4, 2, 2, torch.float32, backend.device)
    mask[0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    exact_loss, exact_grad = exact_loss_and_grad(pred, imgs, mask, 4, True)
    pred[0, 1] = float("nan")
    imgs[0, :, 0:4, 4:8] = float("inf")  # pixels of patch 1
    leaf = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(leaf, imgs, mask, 4, backend=backend.name)
    loss.backward()
    assert_loss_close(loss, exact_loss)
    assert torch.equal(leaf.grad[0, 1], torch.zeros_like(leaf.grad[0, 1]))
    assert_grad_close(leaf.grad, exact_grad)


@pytest.mark.backends("triton", "cuda")
@pytest.mark.parametrize("upstream", [1.0, 2.0], ids=["unit", "scaled"])
def test_second_backward_through_the_graph_is_a_clear_error(backend, upstream):
    pred, imgs, mask = loss_inputs(2, 3, 4, 2, 3, torch.bfloat16, backend.device)
    leaf = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(leaf, imgs, mask, 4, backend=backend.name) * upstream
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    with pytest.raises(RuntimeError, match=r"second backward.*backend='reference'"):
        loss.backward()
    assert torch.equal(leaf.grad, first)
    assert_grad_close(first, exact_loss_and_grad(pred, imgs, mask, 4, True, grad_loss=upstream)[1])

    reference_leaf = pred.clone().requires_grad_()  # what the message recommends does support it
    reference_loss = ops.masked_mse_loss(reference_leaf, imgs, mask, 4, backend="reference")
    reference_loss.backward(retain_graph=True)
    reference_loss.backward()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_independent_passes_accumulate_into_the_leaf_grad(backend, dtype):
    """Three forward/backward passes: .grad is the sum of the three gradients (the first pass's buffer,
    which .grad may keep, is not overwritten by the later ones)."""
    pred, imgs, mask = loss_inputs(2, 3, 4, 2, 3, dtype, backend.device)
    _, other_imgs, other_mask = loss_inputs(2, 3, 4, 2, 3, dtype, backend.device)
    passes = [(imgs, mask, 1.0), (other_imgs, other_mask, 0.25), (imgs, mask, 1.0)]
    leaf = pred.clone().requires_grad_()
    expected = None
    for pass_imgs, pass_mask, upstream in passes:
        (ops.masked_mse_loss(leaf, pass_imgs, pass_mask, 4, backend=backend.name) * upstream).backward()
        single = pred.clone().requires_grad_()
        (ops.masked_mse_loss(single, pass_imgs, pass_mask, 4, backend=backend.name) * upstream).backward()
        exact_grad = exact_loss_and_grad(pred, pass_imgs, pass_mask, 4, True, upstream)[1]
        assert_grad_close(single.grad, exact_grad)
        expected = single.grad if expected is None else expected + single.grad
    assert torch.equal(leaf.grad, expected)


def test_forward_and_backward_are_deterministic(backend):
    pred, imgs, mask = loss_inputs(3, 3, 8, 5, 7, torch.bfloat16, backend.device)
    mask = mask * torch.rand_like(mask)  # fractional weights: summation order would show in the bits
    results = []
    for _ in range(2):
        leaf = pred.clone().requires_grad_()
        loss = ops.masked_mse_loss(leaf, imgs, mask, 8, backend=backend.name)
        (loss * 0.75).backward()
        results.append((loss.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.backends("triton", "cuda")
def test_imgs_requiring_grad_go_to_the_reference(backend):
    pred, imgs, mask = loss_inputs(1, 3, 4, 2, 2, torch.float32, backend.device)
    imgs.requires_grad_()
    reason = dispatch.explain("masked_mse_loss", pred, imgs, mask, 4, True, 1e-6)[backend.name]
    assert "imgs requires grad" in reason
    with pytest.raises(dispatch.BackendError, match="requires grad"):
        ops.masked_mse_loss(pred, imgs, mask, 4, backend=backend.name)
    primitive = getattr(torch.ops, NAMESPACE_OF[backend.name]).masked_mse_loss
    with pytest.raises(RuntimeError, match="no gradient for imgs"):
        primitive(pred, imgs, mask, 4, True, 1e-6, True)[0].backward()


@pytest.mark.backends("triton", "cuda")
def test_float64_and_huge_patches_are_left_to_the_reference(backend):
    pred, imgs, mask = loss_inputs(1, 1, 4, 1, 2, torch.float64, backend.device)
    assert "pred is float64" in dispatch.explain("masked_mse_loss", pred, imgs, mask, 4, True, 1e-6)[backend.name]
    most = MAX_PATCH_VALUES[backend.name]
    p = int((most / 3) ** 0.5) + 1  # p * p * 3 values: more than the kernel holds
    pred, imgs, mask = loss_inputs(1, 3, p, 1, 1, torch.float32, backend.device)
    assert pred.shape[-1] > most
    reason = dispatch.explain("masked_mse_loss", pred, imgs, mask, p, True, 1e-6)[backend.name]
    assert f"patch_values <= {most}" in reason


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
def test_bad_input_is_a_clear_error(backend, change, message):
    pred, imgs, mask = change(*loss_inputs(2, 3, 4, 2, 2, torch.float32, backend.device))
    with pytest.raises(ValueError, match=message):
        ops.masked_mse_loss(pred, imgs, mask, 4, backend=backend.name)


def test_bad_scalars_are_a_clear_error(backend):
    pred, imgs, mask = loss_inputs(1, 1, 4, 1, 2, torch.float32, backend.device)
    with pytest.raises(ValueError, match="eps must be positive"):
        ops.masked_mse_loss(pred, imgs, mask, 4, eps=0.0, backend=backend.name)
    pred1, imgs1, mask1 = loss_inputs(1, 1, 1, 2, 2, torch.float32, backend.device)
    with pytest.raises(ValueError, match="at least 2 values per patch"):
        ops.masked_mse_loss(pred1, imgs1, mask1, 1, backend=backend.name)


@pytest.mark.gpu
@pytest.mark.backends("triton")  # one inductor build per op: the CUDA kernel's, the primitive test below
def test_torch_compile_inductor_public_op_gpu(backend):
    pred, imgs, mask = loss_inputs(4, 3, 16, 4, 6, torch.bfloat16, backend.device)

    def step(pred):
        return ops.masked_mse_loss(pred, imgs, mask, 16, backend=backend.name) * 2.0

    torch._dynamo.reset()
    leaf = pred.clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True)(leaf)
    loss.backward()
    exact_loss, exact_grad = exact_loss_and_grad(pred, imgs, mask, 16, True, grad_loss=2.0)
    torch.testing.assert_close(loss.double(), 2.0 * exact_loss, rtol=2e-5, atol=0)
    assert_grad_close(leaf.grad, exact_grad)


@pytest.mark.gpu
@pytest.mark.backends("triton", "cuda")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_mae_base_shape_and_determinism(backend, dtype):
    pred, imgs, mask = loss_inputs(16, 3, 16, 14, 14, dtype, backend.device)
    exact_loss, exact_grad = exact_loss_and_grad(pred, imgs, mask, 16, True)
    leaf = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(leaf, imgs, mask, 16, backend=backend.name)
    loss.backward()
    assert_loss_close(loss, exact_loss)
    assert_grad_close(leaf.grad, exact_grad)
    again_leaf = pred.clone().requires_grad_()
    again = ops.masked_mse_loss(again_leaf, imgs, mask, 16, backend=backend.name)
    again.backward()
    assert torch.equal(loss.detach(), again.detach()), "the reduction must give the same bits on every run"
    assert torch.equal(leaf.grad, again_leaf.grad)


# --- the primitives, on every namespace ------------------------------------------------------------------

PRIMITIVES = ("masked_mse_loss", "masked_mse_loss_backward", "masked_mse_loss_backward_")


@pytest.mark.primitives(*PRIMITIVES)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw_pix"])
def test_loss_primitives_and_the_backward_rules(ns, shape, dtype, norm_pix):
    """The forward's loss, saved gradient and mask sum; the backward out of place and in place for several
    upstream gradients; store_grad=False saves nothing; the loss is bitwise reproducible."""
    p = shape[4]
    pred, imgs, mask = grid_inputs(shape, dtype, ns.device)
    exact_loss, exact_grad = exact_loss_and_grad(pred, imgs, mask, p, norm_pix)
    loss, saved_grad, mask_sum = ns.ops.masked_mse_loss(pred, imgs, mask, p, norm_pix, 1e-6, True)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_loss_close(loss, exact_loss)
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-6)
    assert mask_sum.shape == () and mask_sum.item() == mask.sum().item()
    assert saved_grad.dtype == dtype and saved_grad.is_contiguous() and saved_grad.shape == pred.shape
    if not masked_mse.saves_residual(dtype):  # the forward's buffer is already the gradient for grad_loss 1
        assert_grad_close(saved_grad, exact_grad)
    for upstream in UPSTREAM_GRADS:
        grad_loss = torch.tensor(upstream, device=ns.device)
        out_of_place = ns.ops.masked_mse_loss_backward(grad_loss, saved_grad, mask_sum)
        in_place = saved_grad.clone()
        ns.ops.masked_mse_loss_backward_(in_place, grad_loss, mask_sum)
        for grad in (out_of_place, in_place):
            assert_grad_close(grad, exact_grad * upstream)
    assert ns.ops.masked_mse_loss(pred, imgs, mask, p, norm_pix, 1e-6, False)[1].shape == (0,)
    again = ns.ops.masked_mse_loss(pred, imgs, mask, p, norm_pix, 1e-6, True)[0]
    assert torch.equal(again, loss), "the loss must be bitwise reproducible"


@pytest.mark.primitives(*PRIMITIVES)
def test_unit_upstream_gradient_hands_out_the_forward_buffer(ns):
    """loss.backward() returns the forward's saved gradient itself (same storage), its values unchanged."""
    pred, imgs, mask = loss_inputs(2, 3, 4, 3, 2, torch.bfloat16, ns.device)
    leaf = pred.clone().requires_grad_()
    loss, saved_grad, _ = ns.ops.masked_mse_loss(leaf, imgs, mask, 4, True, 1e-6, True)
    forward_values = saved_grad.clone()
    (grad,) = torch.autograd.grad(loss, leaf)
    assert grad.data_ptr() == saved_grad.data_ptr()
    assert torch.equal(grad, forward_values)
    assert_grad_close(grad, exact_loss_and_grad(pred, imgs, mask, 4, True)[1])


@pytest.mark.primitives(*PRIMITIVES)
def test_float16_gradient_survives_a_grad_scaler(ns):
    """float16 pred close to its target (small residuals) and the upstream gradient of a GradScaler: the
    gradient, several times the smallest fp16 normal once scaled, stays within one ulp. A forward that saved
    the gradient for an upstream gradient of 1 would round it in fp16's subnormal range first (or flush it
    to 0) and the scaling could not bring the lost bits back; the kernels save the O(1) residual instead."""
    b, c, p, grid = 2, 3, 4, 4
    imgs = torch.rand(b, c, grid * p, grid * p, device=ns.device)
    target = reference.patchify(imgs, p)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = (normed + 1e-2 * torch.randn_like(normed)).half()
    mask = torch.ones(b, grid * grid, device=ns.device)
    exact_grad = exact_loss_and_grad(pred, imgs, mask, p, True, grad_loss=1024.0)[1]
    leaf = pred.clone().requires_grad_()
    (ns.ops.masked_mse_loss(leaf, imgs, mask, p, True, 1e-6, True)[0] * 1024.0).backward()
    assert_grad_close(leaf.grad, exact_grad)


@pytest.mark.primitives(*PRIMITIVES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_opcheck(ns, dtype):
    """The three custom ops: schema (the in-place backward declares its mutation), fake impls, AOTAutograd.

    opcheck's autograd check backpropagates an upstream gradient of 1 through the forward, then compares
    the op's outputs with AOTAutograd's. The eager backward hands out the op's second output (saved_grad)
    scaled in place, so that comparison holds where the factor is then 1 and the values stay (the final
    gradient is saved). Where the buffer is a residual (fp16: factor 2 / (N * mask_sum)) the
    forward is checked without autograd, and both backward ops directly, as for every dtype.
    """
    pred, imgs, mask = loss_inputs(2, 3, 4, 2, 3, dtype, ns.device)
    op = ns.ops.masked_mse_loss.default
    with_autograd = not masked_mse.saves_residual(dtype)
    torch.library.opcheck(op, (pred.clone().requires_grad_(with_autograd), imgs, mask, 4, True, 1e-6, True))
    torch.library.opcheck(op, (pred, imgs, mask, 4, True, 1e-6, False))
    _, saved_grad, mask_sum = op(pred, imgs, mask, 4, False, 1e-6, True)
    for upstream in (0.5, 1.0):
        grad_loss = torch.tensor(upstream, device=ns.device)
        torch.library.opcheck(ns.ops.masked_mse_loss_backward.default, (grad_loss, saved_grad, mask_sum))
        torch.library.opcheck(ns.ops.masked_mse_loss_backward_.default, (saved_grad.clone(), grad_loss, mask_sum))


def _graph_targets(graph_module) -> set[str]:
    return {str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"}


@pytest.mark.primitives(*PRIMITIVES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_torch_compile_fullgraph(ns, dtype):
    """Fake impls + registered autograd let dynamo/AOTAutograd trace the forward and backward custom ops.

    On the CPU: AOTAutograd with eager graphs (inductor's CPU codegen around interpreter launches only
    costs time) and the primitive itself: the public op's dispatcher also runs the other backends' checks,
    whose tracing is not this kernel's concern (the GPU test above compiles the public op with inductor).
    The traced backward scales out of place, so its saved buffer survives a second backward.
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    pred, imgs, mask = loss_inputs(2, 3, 4, 2, 3, dtype, ns.device)
    backward_graphs = []

    def keep_backward(graph_module, example_inputs):
        backward_graphs.append(graph_module)
        return make_boxed_func(graph_module)

    def step(pred, imgs, mask):
        return loss_and_saved_grad(ns.ops, pred, imgs, mask, 4, True, 1e-6) * 2.0

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=lambda gm, example_inputs: make_boxed_func(gm), bw_compiler=keep_backward)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    leaf = pred.clone().requires_grad_()
    loss = compiled(leaf, imgs, mask)
    loss.backward(retain_graph=True)
    exact_loss, exact_grad = exact_loss_and_grad(pred, imgs, mask, 4, True, grad_loss=2.0)
    torch.testing.assert_close(loss.double(), 2.0 * exact_loss, rtol=2e-5, atol=0)
    assert_grad_close(leaf.grad, exact_grad)
    first = leaf.grad.clone()
    loss.backward()
    assert torch.equal(leaf.grad, 2 * first)
    (graph,) = backward_graphs
    assert f"{ns.name}.masked_mse_loss_backward.default" in _graph_targets(graph)
    assert f"{ns.name}.masked_mse_loss_backward_.default" not in _graph_targets(graph)


@pytest.mark.gpu
@pytest.mark.primitives(*PRIMITIVES)
@pytest.mark.namespaces("mae_fast")  # the Triton one: the public op above
def test_torch_compile_inductor_gpu(ns):
    """The primitive under inductor without a graph break: the compiled loss and gradient equal the eager ones."""

    def step(pred, imgs, mask):
        return ns.ops.masked_mse_loss(pred, imgs, mask, 8, True, 1e-6, True)[0] * 2.0

    imgs, mask = torch.randn(2, 3, 32, 32, device="cuda"), torch.ones(2, 16, device="cuda")
    pred = torch.randn(2, 16, 192, device="cuda", requires_grad=True)
    assert_compiles_like_eager(lambda pred: step(pred, imgs, mask), [pred], backend=None)


# --- the Triton kernels ------------------------------------------------------------------------------------


def _poisoned_buffers(pred, store_grad=True):
    buffers = masked_mse.forward_buffers(pred, store_grad)
    for value in buffers.values():
        value.fill_(float("nan"))
    return buffers


@pytest.mark.parametrize("shape", LOSS_SHAPES[4:], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw_pix"])
def test_triton_kernels_write_every_output(device, shape, dtype, norm_pix):
    """The forward into NaN-filled buffers (with and without a gradient) and the out-of-place backward into
    a NaN-filled gradient write every element: the same bits as the primitives."""
    p = shape[4]
    pred, imgs, mask = grid_inputs(shape, dtype, device)
    loss, saved_grad, mask_sum = torch.ops.mae_fast_triton.masked_mse_loss(pred, imgs, mask, p, norm_pix, 1e-6, True)
    buffers = _poisoned_buffers(pred)
    masked_mse.forward_into(pred, imgs, mask, p, norm_pix, 1e-6, **buffers)
    assert torch.equal(buffers["loss"], loss) and torch.equal(buffers["mask_sum"], mask_sum)
    assert torch.equal(buffers["saved_grad"], saved_grad)
    no_grad = _poisoned_buffers(pred, store_grad=False)
    masked_mse.forward_into(pred, imgs, mask, p, norm_pix, 1e-6, **no_grad)
    assert no_grad["saved_grad"].shape == (0,) and torch.equal(no_grad["loss"], loss)
    grad_loss = torch.tensor(0.25, device=device)
    out_of_place = torch.full_like(pred, float("nan"))
    masked_mse.scale_grad_into(saved_grad, grad_loss, mask_sum, out_of_place)
    assert torch.equal(
        out_of_place, torch.ops.mae_fast_triton.masked_mse_loss_backward(grad_loss, saved_grad, mask_sum)
    )


SIGNALING_NAN_BITS = {torch.float32: 0x7F800001, torch.bfloat16: 0x7F81, torch.float16: 0x7C01}
INT_OF_SIZE = {4: torch.int32, 2: torch.int16}


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # NaN * 1, on purpose
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_triton_in_place_backward_with_factor_one_writes_nothing(device, dtype):
    """The in-place backward's programs return without storing when the factor is exactly 1.

    The buffer holds signalling NaNs: a multiply (CPU or GPU) quiets them, so any store by the kernel
    changes their bits, as the out-of-place backward (which always writes) shows. For fp16 the factor
    is 2 * grad_loss / (N * mask_sum), exactly 1 here with mask_sum = 2 / N.
    """
    values = 64
    int_dtype = INT_OF_SIZE[torch.finfo(dtype).bits // 8]
    bits = torch.full((3, 5, values), SIGNALING_NAN_BITS[dtype], dtype=int_dtype, device=device)
    saved_grad = bits.clone().view(dtype)
    grad_loss = torch.ones((), device=device)
    mask_sum = torch.tensor(2.0 / values if masked_mse.saves_residual(dtype) else 7.0, device=device)

    masked_mse.scale_grad_(saved_grad, grad_loss, mask_sum)
    assert torch.equal(saved_grad.view(int_dtype), bits)
    written = torch.empty_like(saved_grad)
    masked_mse.scale_grad_into(saved_grad, grad_loss, mask_sum, written)
    assert written.isnan().all() and not torch.equal(written.view(int_dtype), bits)


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "out_of_place"])
def test_triton_backward_loops_over_more_blocks_than_programs(device, in_place):
    """Each program of the backward's grid strides over several blocks; the last one is partial."""
    numel = 5 * masked_mse._SCALE_BLOCK + 17
    saved_grad = torch.randn(1, 1, numel, device=device)
    grad_loss = torch.tensor(-1.5, device=device)
    grad = saved_grad.clone() if in_place else torch.full_like(saved_grad, float("nan"))
    masked_mse._scale_grad_kernel[(2,)](
        grad if in_place else saved_grad,
        grad,
        grad_loss,
        torch.ones((), device=device),
        numel,
        N=numel,
        FROM_RESIDUAL=False,
        SKIP_UNIT_SCALE=in_place,
        BLOCK=masked_mse._SCALE_BLOCK,
        ROUND_BF16=False,
    )
    assert torch.equal(grad, saved_grad * -1.5)


def test_triton_finalize_sums_more_partials_than_one_block(device):
    """Batches with more programs than the finalize block: the fixed-order loop over the partials."""
    programs = 2 * masked_mse._FINALIZE_BLOCK + 37
    partials = torch.rand(programs, device=device)
    mask_sum = torch.tensor(123.0, device=device)
    loss = torch.full((), float("nan"), device=device)
    masked_mse._masked_mse_finalize_kernel[(1,)](partials, mask_sum, loss, programs, BLOCK=masked_mse._FINALIZE_BLOCK)
    torch.testing.assert_close(loss.double(), partials.double().sum() / 123.0, rtol=1e-6, atol=0)


def test_triton_mask_sum_loops_over_more_rows_than_one_block(device):
    """The one-program mask sum over a transposed (strided) mask of more than one block of rows."""
    batch, length = 3, masked_mse._MASK_SUM_BLOCK // 2 + 5
    mask = torch.rand(length, batch, device=device).t()
    mask_sum = torch.full((), float("nan"), device=device)
    masked_mse._mask_sum_kernel[(1,)](
        mask, mask_sum, batch * length, length, *mask.stride(), BLOCK=masked_mse._MASK_SUM_BLOCK
    )
    torch.testing.assert_close(mask_sum.double(), mask.double().sum(), rtol=1e-6, atol=0)


# Contiguous inputs: Triton specialises the unit strides (stride_pn, stride_iw, stride_ml) as constants.
UNIT_STRIDES = {"stride_pn": 1, "stride_iw": 1, "stride_ml": 1}


def _forward_signature(pred_type, imgs_type):
    ints = ["num_rows", "num_patches", "grid_w"] + [f"stride_{name}" for name in ("pb", "pl", "ib", "ic", "ih", "mb")]
    signature = {"pred_ptr": pred_type, "imgs_ptr": imgs_type, "mask_ptr": "*fp32", "mask_sum_ptr": "*fp32"}
    signature |= {"grad_ptr": pred_type, "partial_ptr": "*fp32"}
    signature.update(dict.fromkeys(ints, "i32"))
    signature["eps"] = "fp32"
    return signature


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


def _forward_job(arch, patch, pred_type):
    block_m, block_n, num_warps = masked_mse.forward_config(patch * patch * 3)
    constexprs = {"P": patch, "C": 3, "NORM_PIX": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "STORE_GRAD": True}
    constexprs |= {"PRESCALE": pred_type != "*fp16", "ROUND_BF16": False} | UNIT_STRIDES
    signature = _forward_signature(pred_type, "*fp32")
    return aot_job("_masked_mse_forward_kernel", signature, constexprs, arch, num_warps, f"p={patch} {pred_type}")


def _scale_job(arch, grad_type, in_place):
    signature = {"saved_ptr": grad_type, "grad_ptr": grad_type, "grad_loss_ptr": "*fp32", "mask_sum_ptr": "*fp32"}
    signature["numel"] = "i32"
    constexprs = {"N": 768, "FROM_RESIDUAL": grad_type == "*fp16", "SKIP_UNIT_SCALE": in_place}
    constexprs |= {"BLOCK": masked_mse._SCALE_BLOCK, "ROUND_BF16": False}
    label = f"{grad_type} {'in place' if in_place else 'out of place'}"
    return aot_job("_scale_grad_kernel", signature, constexprs, arch, 8, label)


AOT_ARCHS = (90, 80)
AOT_PATCHES = (16, 14, 8)
AOT_SCALES = (("*bf16", True), ("*fp16", True), ("*bf16", False))


def aot_jobs():
    jobs = []
    for arch in AOT_ARCHS:
        jobs += [_forward_job(arch, patch, "*bf16") for patch in AOT_PATCHES]
        jobs.append(_forward_job(arch, 16, "*fp16"))
        jobs += [_scale_job(arch, grad_type, in_place) for grad_type, in_place in AOT_SCALES]
        mask_sum_signature = {"mask_ptr": "*fp32", "mask_sum_ptr": "*fp32", "num_rows": "i32", "num_patches": "i32"}
        mask_sum_signature["stride_mb"] = "i32"
        mask_sum_constexprs = {"stride_ml": 1, "BLOCK": masked_mse._MASK_SUM_BLOCK}
        jobs.append(aot_job("_mask_sum_kernel", mask_sum_signature, mask_sum_constexprs, arch, 8, ""))
        finalize_signature = {"partial_ptr": "*fp32", "mask_sum_ptr": "*fp32", "loss_ptr": "*fp32"}
        finalize_signature["num_programs"] = "i32"
        finalize_constexprs = {"BLOCK": masked_mse._FINALIZE_BLOCK}
        jobs.append(aot_job("_masked_mse_finalize_kernel", finalize_signature, finalize_constexprs, arch, 4, ""))
    return jobs


register_aot_jobs("loss", aot_jobs())


def test_triton_kernels_compile_for_sm90_and_sm80_without_spills():
    reports = check_aot_builds("loss", AOT_ARCHS)
    assert len(reports) == len(AOT_ARCHS) * (len(AOT_PATCHES) + 1 + len(AOT_SCALES) + 2)
