"""Triton unshuffle_mask_tokens against the reference (patchify, patch_embed: tests/ops/).

Without a GPU the kernels run on CPU tensors through Triton's interpreter (tests/conftest.py), so the
shapes are small. Every output starts as NaN (MAE_FAST_POISON_OUTPUTS), so an element a kernel does
not write fails the comparison. Arithmetic results are judged against the float64 reference of the
same (already rounded) inputs: the kernel's error may be at most twice the error of the reference
computed in the kernel's own dtype, plus a small floor (the flash-attention rule). Pure data movement
(gathers, scatters, row moves) must match exactly.
"""

from __future__ import annotations

import pytest
import torch
from mae_fast.kernels import patchify_gather as gather_kernel
from mae_fast.kernels import unshuffle as unshuffle_kernel
from triton_aot import compile_reports

from mae_fast import dispatch, ops, reference
from mae_fast.models import create_model

TRITON = torch.ops.mae_fast_triton
HALF_AND_FULL = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv(gather_kernel.POISON_ENV, "1")


def assert_close(actual, same_precision, exact64, name):
    """|actual - exact| <= 2 |same_precision - exact| + floor, elementwise maximum; NaN fails."""
    assert actual.shape == exact64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact64.shape)}"
    assert actual.dtype == same_precision.dtype, f"{name}: dtype {actual.dtype} != {same_precision.dtype}"
    error = (actual.double() - exact64).abs().max().item()
    reference_error = (same_precision.double() - exact64).abs().max().item()
    bound = 2 * reference_error + FLOOR[actual.dtype] * max(1.0, exact64.abs().max().item())
    assert error <= bound, f"{name}: max error {error:.3g} > bound {bound:.3g} (reference error {reference_error:.3g})"


def keep_ids(batch, num_patches, kept, device, dtype=torch.int64):
    """Distinct patch ids per row, as random_masking gives them."""
    rows = [torch.randperm(num_patches)[:kept] for _ in range(batch)]
    return torch.stack(rows).to(device=device, dtype=dtype)


def grads_of(fn, inputs, grad_out):
    """Forward ``fn(*inputs)`` with fresh leaves; returns (output, grads of the float leaves)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [leaf.grad if leaf is not None and leaf.requires_grad else None for leaf in leaves]


# --- patchify_gather ---------------------------------------------------------------------------------


# --- unshuffle_mask_tokens ---------------------------------------------------------------------------

# (B, L, K, Dd): L = K = 1; K = 1; K = L; L + 1 not a row-block multiple and Dd > BLOCK_N
UNSHUFFLE_SHAPES = [(1, 1, 1, 16), (2, 7, 1, 24), (3, 21, 21, 40), (2, 37, 9, 160)]


def _unshuffle_inputs(device, shape, dtype, mask_shape=(1, 1), pos_layout="3d"):
    b, length, k, dim = shape
    _, ids_restore, _ = reference.random_masking(torch.rand(b, length, device=device), k)
    x = torch.randn(b, k + 1, dim, device=device).to(dtype)
    mask_token = torch.randn(*mask_shape, dim, device=device)  # a float32 parameter, as in the model
    pos = {"none": None, "2d": torch.randn(length + 1, dim), "3d": torch.randn(1, length + 1, dim)}[pos_layout]
    return x, mask_token, ids_restore, None if pos is None else pos.to(device)


def _check_unshuffle(inputs, dtype):
    x, _, ids_restore, _ = inputs
    grad_out = torch.randn(x.shape[0], ids_restore.shape[1] + 1, x.shape[2], device=x.device).to(dtype)
    out, grads = grads_of(lambda *a: ops.unshuffle_mask_tokens(*a, backend="triton"), inputs, grad_out)
    same, same_grads = grads_of(reference.unshuffle_mask_tokens, inputs, grad_out)
    as64 = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    exact, exact_grads = grads_of(reference.unshuffle_mask_tokens, as64, grad_out.double())
    assert_close(out, same, exact, "out")
    assert torch.equal(grads[0], same_grads[0]), "grad of x is a permutation of grad_out's rows"
    for name, index in (("mask_token", 1), ("pos_embed", 3)):
        if exact_grads[index] is None:
            assert grads[index] is None, name
        else:
            assert_close(grads[index], same_grads[index], exact_grads[index], f"grad of {name}")


@pytest.mark.parametrize("shape", UNSHUFFLE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
def test_unshuffle_mask_tokens_matches_reference(device, shape, dtype):
    _check_unshuffle(_unshuffle_inputs(device, shape, dtype), dtype)


@pytest.mark.parametrize("mask_shape,pos_layout", [((), "none"), ((1, 1), "2d")])
def test_unshuffle_mask_tokens_optional_inputs(device, mask_shape, pos_layout):
    _check_unshuffle(_unshuffle_inputs(device, (2, 11, 4, 24), torch.float16, mask_shape, pos_layout), torch.float16)


def test_unshuffle_mask_tokens_non_contiguous(device):
    x, mask_token, ids_restore, pos = _unshuffle_inputs(device, (2, 11, 4, 24), torch.float32)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)
    ids_restore = ids_restore.t().contiguous().t()
    assert not x.is_contiguous() and not ids_restore.is_contiguous()
    _check_unshuffle((x, mask_token, ids_restore, pos), torch.float32)


def test_int32_ids_give_the_same_results(device):
    x, mask_token, ids_restore, dpos = _unshuffle_inputs(device, (2, 11, 4, 24), torch.float32)
    grad = torch.randn(2, 12, 24, device=device)
    results = [
        grads_of(lambda *a: ops.unshuffle_mask_tokens(*a, backend="triton"), (x, mask_token, i, dpos), grad)
        for i in (ids_restore, ids_restore.int())
    ]
    (out64, grads64), (out32, grads32) = results
    assert torch.equal(out64, out32) and torch.equal(grads64[0], grads32[0]) and torch.equal(grads64[1], grads32[1])


def test_unshuffle_mask_token_grad_is_deterministic(device):
    _, ids_restore, _ = reference.random_masking(torch.rand(6, 30, device=device), 7)
    grad = torch.randn(6, 31, 40, device=device)
    first = TRITON.unshuffle_mask_tokens_backward(grad, ids_restore, 7, True)
    second = TRITON.unshuffle_mask_tokens_backward(grad, ids_restore, 7, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# --- custom-op registration, torch.compile -----------------------------------------------------------


def _custom_op_cases(device):
    b, d, k = 2, 24, 3
    x, mask_token, ids_restore, dpos = _unshuffle_inputs(device, (b, 6, k, d), torch.float32)
    x, mask_token, dpos = [t.requires_grad_() for t in (x, mask_token, dpos)]
    return {
        "unshuffle_mask_tokens": (TRITON.unshuffle_mask_tokens, (x, mask_token, ids_restore, dpos)),
        "unshuffle_mask_tokens_backward": (
            TRITON.unshuffle_mask_tokens_backward,
            (torch.randn(b, 7, d, device=device), ids_restore, k, True),
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unshuffle_mask_tokens",
        "unshuffle_mask_tokens_backward",
    ],
)
def test_opcheck(device, case):
    op, args = _custom_op_cases(device)[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_traces_all_three_ops(device):
    """Fake impls + registered autograd let dynamo/AOTAutograd trace forward and backward in one graph.

    On the CPU this uses backend="aot_eager": inductor's CPU codegen around interpreter launches takes
    ~90 s on 2 cores (the GPU test below compiles with inductor). The custom ops are called directly: the
    public ops check index ranges on CPU tensors with a host sync (int(ids.min())), and the dispatcher
    asks every backend's check, the CUDA one included, which dynamo cannot trace.
    """
    x, mask_token, ids_restore, dpos = _unshuffle_inputs(device, (2, 6, 3, 24), torch.float32)

    def step(x, mask_token):
        decoder_in = TRITON.unshuffle_mask_tokens(x, mask_token, ids_restore, dpos)
        return decoder_in.square().sum()

    leaves = [t.requires_grad_() for t in (x, mask_token)]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss = step(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    compiled_loss = compiled(*leaves)
    compiled_grads = torch.autograd.grad(compiled_loss, leaves)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.gpu
def test_torch_compile_inductor_gpu():
    """Inductor around the three custom ops (the public ops' dispatcher is not traced: see the test above)."""
    device = torch.device("cuda")
    x, mask_token, ids_restore, dpos = _unshuffle_inputs(device, (8, 12, 3, 128), torch.bfloat16)

    def step(x):
        decoder_in = TRITON.unshuffle_mask_tokens(x, mask_token, ids_restore, dpos)
        return decoder_in.float().square().sum()

    leaves = [t.requires_grad_() for t in (x,)]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_grads = torch.autograd.grad(step(*leaves), leaves)
    compiled_grads = torch.autograd.grad(compiled(*leaves), leaves)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
def test_release_sized_shapes_gpu(dtype):
    """ViT-B/16 at 224 px, mask 0.75 (K = 49 of 196), decoder 512 wide."""
    device = torch.device("cuda")
    _check_unshuffle(_unshuffle_inputs(device, (16, 196, 49, 512), dtype), dtype)


# --- the model --------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_model_with_triton_gather_ops_matches_reference(device, monkeypatch, norm_pix_loss):
    """backend="triton" runs these three ops in the model; ops owned elsewhere are pinned to the
    reference here so that this test judges only the kernels of this file."""
    mine = {"unshuffle_mask_tokens"}
    for op in set(dispatch.ops()) - mine:
        implementations = dispatch._ops[op].implementations
        monkeypatch.setitem(implementations, "triton", implementations["reference"])
    model = create_model("mae_vit_tiny_patch4_32", depth=1, decoder_depth=1, norm_pix_loss=norm_pix_loss).to(device)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    noise = torch.rand(2, model.num_patches, device=device)
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        model.set_backend(backend)
        loss, pred, mask = model(imgs, noise=noise)
        loss.backward()
        results[backend] = (
            loss.detach(),
            pred.detach(),
            mask,
            {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None},
        )
    (loss, pred, mask, grads), (ref_loss, ref_pred, ref_mask, ref_grads) = results["triton"], results["reference"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, ref_mask)
    assert grads.keys() == ref_grads.keys() and "patch_embed.proj.weight" in grads and "mask_token" in grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# --- bad input -----------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(device):
    x, mask_token, ids_restore, dpos = _unshuffle_inputs(device, (2, 6, 4, 24), torch.float32)
    cases = [
        (lambda: ops.unshuffle_mask_tokens(x, mask_token, ids_restore + 6, dpos, backend="triton"), "ids_restore"),
        (lambda: ops.unshuffle_mask_tokens(x, mask_token, ids_restore.float(), dpos, backend="triton"), "int64"),
        (lambda: ops.unshuffle_mask_tokens(x[:1], mask_token, ids_restore, dpos, backend="triton"), "batch size"),
        (lambda: ops.unshuffle_mask_tokens(x, mask_token.to("meta"), ids_restore, dpos, backend="triton"), "device"),
        (lambda: ops.unshuffle_mask_tokens(x, mask_token[..., :3], ids_restore, dpos, backend="triton"), "mask_token"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_triton_backend_refusals_name_the_reason(device):
    x, mask_token, ids_restore, dpos = _unshuffle_inputs(device, (1, 4, 2, 16), torch.float64)
    with pytest.raises(dispatch.BackendError, match="float64"):
        ops.unshuffle_mask_tokens(x, mask_token, ids_restore, dpos, backend="triton")
    x, mask_token, _, _ = _unshuffle_inputs(device, (1, 4, 2, 16), torch.float32)
    with pytest.raises(dispatch.BackendError, match="permutations of 0..3"):
        ops.unshuffle_mask_tokens(x, mask_token, torch.tensor([[0, 1, 1, 3]], device=device), backend="triton")


# --- ahead-of-time compilation for the GPU -------------------------------------------------------------


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


def _aot_jobs():
    """The launchers' default configs, at ViT-B/16 sizes (p = 16, C = 3, D = 768, Dd = 512) and p = 14."""
    jobs = {
        "unshuffle bf16": _unshuffle_job("bf16", 90, False),
        "unshuffle fp16": _unshuffle_job("fp16", 80, False),
        "unshuffle backward bf16": _unshuffle_job("bf16", 90, True),
        "unshuffle backward fp32": _unshuffle_job("fp32", 80, True),
    }
    keys = ("module", "kernel", "signature", "constexprs", "arch", "num_warps", "num_stages")
    return [{"label": label.strip(), **dict(zip(keys, job, strict=True))} for label, job in jobs.items()]


def test_kernels_compile_for_sm90_and_sm80_without_spills():
    reports = compile_reports(_aot_jobs())
    assert {report["arch"] for report in reports} == {80, 90}
    for report in reports:
        print(f"{report['label']}: {report['text']}")
    assert all(report["spills"] == 0 for report in reports), [r["text"] for r in reports if r["spills"]]
