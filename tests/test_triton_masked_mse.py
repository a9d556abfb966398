"""The Triton masked_mse_loss (kernels/masked_mse.py) against the float64 reference.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest.py).
"""

import pytest
import torch
from mae_fast.kernels import masked_mse
from torch.utils._python_dispatch import TorchDispatchMode
from triton_aot import compile_reports

from mae_fast import dispatch, ops, reference
from mae_fast.backends.triton import loss as triton_loss
from mae_fast.ops.loss import loss_and_saved_grad

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
    """Within one ulp of pred's dtype per value (the kernel rounds at most twice: the saved gradient or
    fp16 residual, then the scaled gradient).

    fp32 arithmetic (normalising the target) bounds the rest; fp16 gradients this small are subnormal,
    where one ulp is finfo.smallest_normal * eps.
    """
    info = torch.finfo(grad.dtype)
    atol = max(1e-5 * exact.abs().max().item(), info.smallest_normal * info.eps)
    torch.testing.assert_close(grad.double(), exact, rtol=max(info.eps, 1e-5), atol=atol)


def _poisoned_buffers(pred, store_grad=True):
    buffers = masked_mse.forward_buffers(pred, store_grad)
    for value in buffers.values():
        value.fill_(float("nan"))
    return buffers


UPSTREAM_GRADS = [1.0, 0.25, 3.0, 0.0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw_pix"])
def test_forward_and_grad_match_float64_reference(shape, dtype, norm_pix, device):
    """Forward into NaN-filled buffers, then the backward in place and out of place for several grad_loss."""
    p = shape[2]
    pred, imgs, mask = _inputs(*shape, dtype, device)
    exact_loss, exact_grad = _exact(pred, imgs, mask, p, norm_pix)

    buffers = _poisoned_buffers(pred)
    masked_mse.forward_into(pred, imgs, mask, p, norm_pix, 1e-6, **buffers)
    assert buffers["loss"].dtype == torch.float32 and buffers["loss"].dim() == 0
    torch.testing.assert_close(buffers["loss"].double(), exact_loss, rtol=2e-5, atol=0)
    assert buffers["mask_sum"].item() == mask.sum().item()
    saved_grad = buffers["saved_grad"]
    assert saved_grad.dtype == dtype and saved_grad.is_contiguous()
    if not masked_mse.saves_residual(dtype):  # the forward's buffer is already the gradient for grad_loss 1
        _assert_grad_close(saved_grad, exact_grad)

    for upstream in UPSTREAM_GRADS:
        grad_loss = torch.tensor(upstream, device=device)
        out_of_place = torch.full_like(pred, float("nan"))
        masked_mse.scale_grad_into(saved_grad, grad_loss, buffers["mask_sum"], out_of_place)
        in_place = saved_grad.clone()
        masked_mse.scale_grad_(in_place, grad_loss, buffers["mask_sum"])
        for grad in (out_of_place, in_place):
            _assert_grad_close(grad, exact_grad * upstream)


@pytest.mark.parametrize("imgs_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_images(imgs_dtype, device):
    pred, imgs, mask = _inputs(2, 3, 4, 3, 2, torch.bfloat16, device, imgs_dtype)
    exact_loss, exact_grad = _exact(pred, imgs, mask, 4, True)
    loss_pred = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(loss_pred, imgs, mask, 4, backend="triton")
    loss.backward()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=0)
    _assert_grad_close(loss_pred.grad, exact_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("removed", ["one", "all_but_one", "all"])
def test_extreme_masks_and_upstream_gradient(removed, dtype, device):
    """K = L - 1 kept (one patch removed), K = 1 kept, nothing kept; the backward scales by grad_loss."""
    pred, imgs, mask = _inputs(2, 3, 4, 2, 3, dtype, device)
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


def test_no_grad_loss_stores_no_gradient(device):
    pred, imgs, mask = _inputs(2, 3, 4, 2, 3, torch.float16, device)
    buffers = _poisoned_buffers(pred, store_grad=False)
    masked_mse.forward_into(pred, imgs, mask, 4, True, 1e-6, **buffers)
    assert buffers["saved_grad"].shape == (0,)
    exact_loss, _ = _exact(pred, imgs, mask, 4, True)
    torch.testing.assert_close(buffers["loss"].double(), exact_loss, rtol=2e-5, atol=0)
    with torch.no_grad():
        loss = ops.masked_mse_loss(pred.requires_grad_(), imgs, mask, 4, backend="triton")
    torch.testing.assert_close(loss.double(), exact_loss, rtol=2e-5, atol=0)


def test_loss_stores_a_gradient_only_when_pred_needs_one(device):
    pred, imgs, mask = _inputs(1, 3, 4, 2, 2, torch.bfloat16, device)
    stored = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            outputs = func(*args, **(kwargs or {}))
            if func is torch.ops.mae_fast_triton.masked_mse_loss.default:
                stored.append(tuple(outputs[1].shape))
            return outputs

    with Recorder():
        ops.masked_mse_loss(pred, imgs, mask, 4, backend="triton")
        with torch.no_grad():
            ops.masked_mse_loss(pred.clone().requires_grad_(), imgs, mask, 4, backend="triton")
        ops.masked_mse_loss(pred.clone().requires_grad_(), imgs, mask, 4, backend="triton")
    assert stored == [(0,), (0,), tuple(pred.shape)]


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


def test_unit_upstream_gradient_hands_out_the_forward_buffer(device):
    """loss.backward() returns the forward's saved gradient itself (same storage), its values unchanged."""
    pred, imgs, mask = _inputs(2, 3, 4, 3, 2, torch.bfloat16, device)
    leaf = pred.clone().requires_grad_()
    loss, saved_grad, _ = torch.ops.mae_fast_triton.masked_mse_loss(leaf, imgs, mask, 4, True, 1e-6, True)
    forward_values = saved_grad.clone()
    (grad,) = torch.autograd.grad(loss, leaf)
    assert grad.data_ptr() == saved_grad.data_ptr()
    assert torch.equal(grad, forward_values)
    _assert_grad_close(grad, _exact(pred, imgs, mask, 4, True)[1])


SIGNALING_NAN_BITS = {torch.float32: 0x7F800001, torch.bfloat16: 0x7F81, torch.float16: 0x7C01}
INT_OF_SIZE = {4: torch.int32, 2: torch.int16}


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # NaN * 1, on purpose
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_backward_with_factor_one_writes_nothing(dtype, device):
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
def test_backward_loops_over_more_blocks_than_programs(in_place, device):
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


@pytest.mark.parametrize("upstream", [1.0, 2.0], ids=["unit", "scaled"])
def test_second_backward_through_the_graph_is_a_clear_error(upstream, device):
    pred, imgs, mask = _inputs(2, 3, 4, 2, 3, torch.bfloat16, device)
    leaf = pred.clone().requires_grad_()
    loss = ops.masked_mse_loss(leaf, imgs, mask, 4, backend="triton") * upstream
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    with pytest.raises(RuntimeError, match=r"second backward.*backend='reference'"):
        loss.backward()
    assert torch.equal(leaf.grad, first)
    _assert_grad_close(first, _exact(pred, imgs, mask, 4, True, grad_loss=upstream)[1])

    reference_leaf = pred.clone().requires_grad_()  # what the message recommends does support it
    reference_loss = ops.masked_mse_loss(reference_leaf, imgs, mask, 4, backend="reference")
    reference_loss.backward(retain_graph=True)
    reference_loss.backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_independent_passes_accumulate_into_the_leaf_grad(dtype, device):
    """Three forward/backward passes: .grad is the sum of the three gradients (the first pass's buffer,
    which .grad may keep, is not overwritten by the later ones)."""
    pred, imgs, mask = _inputs(2, 3, 4, 2, 3, dtype, device)
    _, other_imgs, other_mask = _inputs(2, 3, 4, 2, 3, dtype, device)
    passes = [(imgs, mask, 1.0), (other_imgs, other_mask, 0.25), (imgs, mask, 1.0)]
    leaf = pred.clone().requires_grad_()
    expected = None
    for pass_imgs, pass_mask, upstream in passes:
        (ops.masked_mse_loss(leaf, pass_imgs, pass_mask, 4, backend="triton") * upstream).backward()
        single = pred.clone().requires_grad_()
        (ops.masked_mse_loss(single, pass_imgs, pass_mask, 4, backend="triton") * upstream).backward()
        _assert_grad_close(single.grad, _exact(pred, pass_imgs, pass_mask, 4, True, upstream)[1])
        expected = single.grad if expected is None else expected + single.grad
    assert torch.equal(leaf.grad, expected)


def test_forward_and_backward_are_deterministic(device):
    pred, imgs, mask = _inputs(3, 3, 8, 5, 7, torch.bfloat16, device)
    mask = mask * torch.rand_like(mask)  # fractional weights: summation order would show in the bits
    results = []
    for _ in range(2):
        leaf = pred.clone().requires_grad_()
        loss = ops.masked_mse_loss(leaf, imgs, mask, 8, backend="triton")
        (loss * 0.75).backward()
        results.append((loss.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


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
    assert pred.shape[-1] > triton_loss.MAX_PATCH_VALUES
    assert "patch_values <= 8192" in dispatch.explain("masked_mse_loss", pred, imgs, mask, p, True, 1e-6)["triton"]


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype, device):
    """The three custom ops: schema (the in-place backward declares its mutation), fake impls, AOTAutograd.

    opcheck's autograd check backpropagates an upstream gradient of 1 through the forward, then compares
    the op's outputs with AOTAutograd's. The eager backward hands out the op's second output (saved_grad)
    scaled in place, so that comparison holds where the factor is then 1 and nothing is written (fp32,
    bf16). For fp16 the buffer is the residual (factor 2 / (N * mask_sum)): its forward is checked
    without autograd, and both backward ops directly, as for every dtype.
    """
    pred, imgs, mask = _inputs(2, 3, 4, 2, 3, dtype, device)
    op = torch.ops.mae_fast_triton.masked_mse_loss.default
    with_autograd = not masked_mse.saves_residual(dtype)
    torch.library.opcheck(op, (pred.clone().requires_grad_(with_autograd), imgs, mask, 4, True, 1e-6, True))
    torch.library.opcheck(op, (pred, imgs, mask, 4, True, 1e-6, False))
    _, saved_grad, mask_sum = op(pred, imgs, mask, 4, False, 1e-6, True)
    for upstream in (0.5, 1.0):
        grad_loss = torch.tensor(upstream, device=device)
        backward = torch.ops.mae_fast_triton.masked_mse_loss_backward.default
        torch.library.opcheck(backward, (grad_loss, saved_grad, mask_sum))
        in_place = torch.ops.mae_fast_triton.masked_mse_loss_backward_.default
        torch.library.opcheck(in_place, (saved_grad.clone(), grad_loss, mask_sum))


def _graph_targets(graph_module) -> set[str]:
    return {str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_torch_compile_fullgraph(dtype, device):
    """Fake impls + registered autograd let dynamo/AOTAutograd trace the forward and backward custom ops.

    On the CPU: AOTAutograd with eager graphs (inductor's CPU codegen around interpreter launches only
    costs time) and the primitive itself: the public op's dispatcher also runs the other backends' checks,
    whose tracing is not this kernel's concern (the GPU test below compiles the public op with inductor).
    The traced backward scales out of place, so its saved buffer survives a second backward.
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    pred, imgs, mask = _inputs(2, 3, 4, 2, 3, dtype, device)
    backward_graphs = []

    def keep_backward(graph_module, example_inputs):
        backward_graphs.append(graph_module)
        return make_boxed_func(graph_module)

    def step(pred, imgs, mask):
        return loss_and_saved_grad(torch.ops.mae_fast_triton, pred, imgs, mask, 4, True, 1e-6) * 2.0

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=lambda gm, example_inputs: make_boxed_func(gm), bw_compiler=keep_backward)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    leaf = pred.clone().requires_grad_()
    loss = compiled(leaf, imgs, mask)
    loss.backward(retain_graph=True)
    exact_loss, exact_grad = _exact(pred, imgs, mask, 4, True, grad_loss=2.0)
    torch.testing.assert_close(loss.double(), 2.0 * exact_loss, rtol=2e-5, atol=0)
    _assert_grad_close(leaf.grad, exact_grad)
    first = leaf.grad.clone()
    loss.backward()
    assert torch.equal(leaf.grad, 2 * first)
    (graph,) = backward_graphs
    assert "mae_fast_triton.masked_mse_loss_backward.default" in _graph_targets(graph)
    assert "mae_fast_triton.masked_mse_loss_backward_.default" not in _graph_targets(graph)


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
    ints = ["num_rows", "num_patches", "grid_w"] + [f"stride_{name}" for name in ("pb", "pl", "ib", "ic", "ih", "mb")]
    signature = {"pred_ptr": pred_type, "imgs_ptr": imgs_type, "mask_ptr": "*fp32", "mask_sum_ptr": "*fp32"}
    signature |= {"grad_ptr": pred_type, "partial_ptr": "*fp32"}
    signature.update(dict.fromkeys(ints, "i32"))
    signature["eps"] = "fp32"
    return signature


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


def _aot_jobs():
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
    assert len(reports) == len(AOT_ARCHS) * (len(AOT_PATCHES) + 1 + len(AOT_SCALES) + 2)
    for report in reports:
        print(f"{report['label']} {report['text']}")
    assert all(report["spills"] == 0 for report in reports), [r["text"] for r in reports if r["spills"]]


def test_finalize_sums_more_partials_than_one_block(device):
    """Batches with more programs than the finalize block: the fixed-order loop over the partials."""
    programs = 2 * masked_mse._FINALIZE_BLOCK + 37
    partials = torch.rand(programs, device=device)
    mask_sum = torch.tensor(123.0, device=device)
    loss = torch.full((), float("nan"), device=device)
    masked_mse._masked_mse_finalize_kernel[(1,)](partials, mask_sum, loss, programs, BLOCK=masked_mse._FINALIZE_BLOCK)
    torch.testing.assert_close(loss.double(), partials.double().sum() / 123.0, rtol=1e-6, atol=0)


def test_mask_sum_loops_over_more_rows_than_one_block(device):
    """The one-program mask sum over a transposed (strided) mask of more than one block of rows."""
    batch, length = 3, masked_mse._MASK_SUM_BLOCK // 2 + 5
    mask = torch.rand(length, batch, device=device).t()
    mask_sum = torch.full((), float("nan"), device=device)
    masked_mse._mask_sum_kernel[(1,)](
        mask, mask_sum, batch * length, length, *mask.stride(), BLOCK=masked_mse._MASK_SUM_BLOCK
    )
    torch.testing.assert_close(mask_sum.double(), mask.double().sum(), rtol=1e-6, atol=0)


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
    again_leaf = pred.clone().requires_grad_()
    again = ops.masked_mse_loss(again_leaf, imgs, mask, 16, backend="triton")
    again.backward()
    assert torch.equal(loss.detach(), again.detach()), "the reduction must give the same bits on every run"
    assert torch.equal(leaf.grad, again_leaf.grad)
