"""CPU-side tests of the CUDA extension mae_fast._C: built, imported, ops registered with the expected
schemas (defined once, in Python), fake implementations and autograd formulas traceable without a GPU,
support declarations that say why the "cuda" backend cannot run, and the compiler's register/spill report
of every kernel.

None of these runs a CUDA kernel; tests/ops/ (the cuda backend and the mae_fast namespace, marker gpu) do,
when a GPU is present.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from mae_fast import _extension, dispatch, primitives
from mae_fast.backends.cuda import _library
from mae_fast.backends.cuda import attention as cuda_attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS_REPORT = os.path.join(REPO, "build", "ptxas_report.txt")

if torch.version.cuda is None:
    pytest.skip("torch is a CPU-only build: the CUDA extension cannot be built", allow_module_level=True)

ops = torch.ops.mae_fast


def test_extension_is_built_and_imported():
    assert _extension.available(), _extension.unavailable_reason()
    assert _extension.unavailable_reason() is None


def test_every_primitive_has_its_one_schema_and_a_cuda_kernel():
    """The schemas are Python's (csrc/ only implements them): each compiled primitive has a CUDA kernel whose
    C++ signature the dispatcher accepted against that schema, and the PyTorch-written ones are registered."""
    assert _extension.available(), _extension.unavailable_reason()
    schemas = primitives.schemas()
    for name in _library.COMPILED + tuple(_library.IN_PYTORCH):
        schema = str(getattr(ops, name).default._schema)
        assert schema == f"mae_fast::{schemas[name]}", (schema, schemas[name])
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mae_fast::{name}", "CUDA"), name
    with open(os.path.join(REPO, "csrc", "mae_fast.cpp")) as binding:
        assert "m.def(" not in binding.read(), "schemas are defined in Python only"


def test_attention_shared_memory_plan_fits_an_h100_h200_block():
    # sm_90 allows 227 KiB of shared memory per block (opt-in); the longest, widest case must fit.
    shared_memory = _extension.module().visible_attention_shared_memory
    assert shared_memory(256, 128) <= 227 * 1024
    assert shared_memory(50, 64) < shared_memory(197, 64) < shared_memory(256, 64) < shared_memory(256, 128)
    with pytest.raises(RuntimeError, match="head_dim"):
        shared_memory(64, 96)
    # the table the support check reads (filled once at import, so checks trace under torch.compile)
    for length, head_dim in ((1, 32), (50, 64), (65, 80), (197, 32), (256, 128)):
        padded = -(-length // 16) * 16
        assert cuda_attention.SHARED_MEMORY[(padded, head_dim)] == shared_memory(length, head_dim)
    assert "shared memory" in cuda_attention.shared_memory_reason(256, 128, 48 * 1024)
    assert cuda_attention.shared_memory_reason(256, 128, 227 * 1024) is None


# --- fake implementations and autograd, traced without a GPU -------------------------------------------


@pytest.fixture
def fake():
    assert _extension.available(), _extension.unavailable_reason()
    with FakeTensorMode():
        yield


def test_fake_patch_ops(fake):
    imgs = torch.empty(2, 3, 8, 12, requires_grad=True)
    ids = torch.zeros(2, 4, dtype=torch.int64)
    for channels_last in (True, False):
        out = ops.gather_patches(imgs, ids, 4, channels_last)
        assert out.shape == (2, 4, 48) and out.dtype == torch.float32
        (grad_imgs,) = torch.autograd.grad(out.sum(), imgs)
        assert grad_imgs.shape == imgs.shape
    scattered = ops.scatter_patches(torch.empty(2, 4, 48, dtype=torch.bfloat16), ids, 4, True, 3, 8, 12)
    assert scattered.shape == (2, 3, 8, 12) and scattered.dtype == torch.bfloat16
    assert ops.patchify(imgs, 4).shape == (2, 6, 48)
    assert ops.unpatchify(torch.empty(2, 6, 48), 4, 2, 3).shape == (2, 3, 8, 12)


def test_fake_patch_embed_gather_and_its_gradients(fake):
    imgs = torch.empty(2, 3, 8, 8, dtype=torch.float16, requires_grad=True)
    ids = torch.zeros(2, 3, dtype=torch.int32)
    weight = torch.empty(16, 3, 4, 4, dtype=torch.float16, requires_grad=True)
    bias = torch.empty(16, dtype=torch.float16, requires_grad=True)
    pos = torch.empty(1, 4, 16, requires_grad=True)
    out = ops.patch_embed_gather(imgs, ids, weight, bias, pos)
    assert out.shape == (2, 3, 16) and out.dtype == torch.float16
    grads = torch.autograd.grad(out.float().sum(), (imgs, weight, bias, pos))
    for grad, tensor in zip(grads, (imgs, weight, bias, pos), strict=True):
        assert grad.shape == tensor.shape and grad.dtype == tensor.dtype


def test_fake_patch_embed_gather_under_autocast(fake):
    """The cuda backend casts imgs, weight and bias to the autocast dtype before the op (as the release's conv
    and the other backends do): a bf16 output, fp32 gradients for fp32 parameters, and a backward whose GEMMs
    see one dtype (the op's own output would otherwise be bf16 from an autocast GEMM inside it, fp32 inputs)."""
    imgs = torch.empty(2, 3, 8, 8, requires_grad=True)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    weight = torch.empty(16, 3, 4, 4, requires_grad=True)
    bias = torch.empty(16, requires_grad=True)
    pos = torch.empty(1, 4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reason = dispatch.unsupported(dispatch.support("patch_embed_gather", "cuda"), _inputs(imgs, ids, weight.half()))
        assert reason is not None and "is on cpu" in reason  # only the device: mixed dtypes are fine under autocast
        out = dispatch._ops["patch_embed_gather"].implementations["cuda"].fn(imgs, ids, weight, bias, pos)
    assert out.shape == (2, 3, 16) and out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), (imgs, weight, bias, pos))
    for grad, tensor in zip(grads, (imgs, weight, bias, pos), strict=True):
        assert grad.shape == tensor.shape and grad.dtype == torch.float32


def test_fake_unshuffle_and_its_gradients(fake):
    x = torch.empty(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    mask_token = torch.empty(1, 1, 32, requires_grad=True)
    ids_restore = torch.zeros(2, 16, dtype=torch.int64)
    pos = torch.empty(1, 17, 32, requires_grad=True)
    out = ops.unshuffle_mask_tokens(x, mask_token, ids_restore, pos)
    assert out.shape == (2, 17, 32) and out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), (x, mask_token, pos))
    for grad, tensor in zip(grads, (x, mask_token, pos), strict=True):
        assert grad.shape == tensor.shape and grad.dtype == tensor.dtype
    grad_x, grad_mask = ops.unshuffle_mask_tokens_backward(torch.empty(2, 17, 32), ids_restore, 4, False)
    assert grad_x.shape == (2, 5, 32) and grad_mask.shape == (0,) and grad_mask.dtype == torch.float32


def test_fake_loss_and_masking(fake):
    pred = torch.empty(2, 4, 48, dtype=torch.bfloat16, requires_grad=True)
    loss, grad, mask_sum = ops.masked_mse_loss(pred, torch.empty(2, 3, 8, 8), torch.empty(2, 4), 4, True, 1e-6, True)
    assert loss.shape == () and loss.dtype == torch.float32
    assert grad.shape == pred.shape and grad.dtype == torch.bfloat16
    assert mask_sum.shape == () and mask_sum.dtype == torch.float32
    (grad_pred,) = torch.autograd.grad(loss, pred)
    assert grad_pred.shape == pred.shape and grad_pred.dtype == pred.dtype
    ids_keep, ids_restore, mask = ops.random_masking(torch.empty(3, 196, dtype=torch.float16), 49)
    assert (ids_keep.shape, ids_keep.dtype) == ((3, 49), torch.int64)
    assert (ids_restore.shape, ids_restore.dtype) == ((3, 196), torch.int64)
    assert (mask.shape, mask.dtype) == ((3, 196), torch.float32)


@pytest.mark.parametrize("packed", [False, True])
def test_fake_attention_and_its_gradients(fake, packed):
    shape = (37, 4, 64) if packed else (2, 19, 4, 64)
    q, k, v = (torch.empty(shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 18, 37], dtype=torch.int32) if packed else None
    out, lse = ops.visible_attention(q, k, v, cu, 19, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (4, 37 if packed else 38) and lse.dtype == torch.float32
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.shape == q.shape and g.dtype == q.dtype for g in grads)


def test_ops_trace_into_a_graph_with_fake_tensors():
    assert _extension.available(), _extension.unavailable_reason()

    def step(pred, imgs, mask, q):
        loss = ops.masked_mse_loss(pred, imgs, mask, 4, True, 1e-6, False)[0]
        return loss, ops.visible_attention(q, q, q, None, 8, 0.125)[0]

    args = (torch.randn(2, 4, 48), torch.randn(2, 3, 8, 8), torch.ones(2, 4), torch.randn(2, 8, 2, 32).half())
    graph = make_fx(step, tracing_mode="fake")(*args)
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {"mae_fast.masked_mse_loss.default", "mae_fast.visible_attention.default"} <= targets


# --- dispatcher checks ---------------------------------------------------------------------------------


def _cpu_cases():
    imgs = torch.randn(2, 3, 8, 8)
    ids_keep = torch.tensor([[0, 3], [2, 1]])
    ids_restore = torch.tensor([[0, 2, 1, 3], [3, 0, 2, 1]])
    q = torch.randn(2, 5, 2, 32, dtype=torch.bfloat16)
    return {
        "patchify": (imgs, 4),
        "unpatchify": (torch.randn(2, 4, 48), 4, (2, 2)),
        "patchify_gather": (imgs, ids_keep, 4),
        "patch_embed_gather": (imgs, ids_keep, torch.randn(16, 3, 4, 4), torch.randn(16), torch.randn(4, 16)),
        "unshuffle_mask_tokens": (torch.randn(2, 3, 16), torch.randn(16), ids_restore, torch.randn(5, 16)),
        "masked_mse_loss": (torch.randn(2, 4, 48), imgs, torch.ones(2, 4), 4, True, 1e-6),
        "random_masking": (torch.rand(2, 4), 1),
        "visible_attention": (q, q, q, None, q.shape[1], 0.25),
    }


@pytest.mark.parametrize("op", sorted(_cpu_cases()))
def test_cuda_backend_refuses_cpu_tensors_with_a_reason(op):
    reason = dispatch.explain(op, *_cpu_cases()[op])["cuda"]
    assert isinstance(reason, str) and ("is on cpu" in reason or "not loaded" in reason), reason
    with pytest.raises(dispatch.BackendError, match="cuda"):
        dispatch.resolve(op, "cuda", *_cpu_cases()[op])


def _inputs(imgs, ids, weight):
    return dispatch._ops["patch_embed_gather"].inputs(imgs, ids, weight, None, None)


def _cuda_reason(op, *args):
    """The cuda backend's refusal of ``args`` made of fake CUDA tensors (the device passes: what remains is
    what the kernels support)."""
    return dispatch.explain(op, *args)["cuda"]


def test_attention_support_reasons(fake):
    def support(shape, dtype=torch.float16, cu=None, max_seqlen=None):
        q = torch.empty(shape, dtype=dtype, device="cuda")
        length = shape[1] if cu is None else max_seqlen
        return _cuda_reason("visible_attention", q, q, q, None if cu is None else cu.cuda(), length, 0.125)

    assert support((2, 50, 12, 64)) is None
    assert support((2, 256, 16, 80), torch.bfloat16) is None
    assert "float32" in support((2, 50, 12, 64), torch.float32)
    assert "head_dim is 96" in support((2, 50, 12, 96))
    assert "max_seqlen <= 256" in support((2, 257, 12, 64))
    assert "max_seqlen <= 256" in support(
        (300, 4, 32), cu=torch.tensor([0, 20, 300], dtype=torch.int32), max_seqlen=280
    )
    assert support((300, 4, 32), cu=torch.tensor([0, 150, 300], dtype=torch.int32), max_seqlen=150) is None
    qkv = torch.empty(2, 5, 3 * 2 * 32, dtype=torch.bfloat16, device="cuda")
    assert _cuda_reason("qkv_attention", qkv, 2, None, 5, 0.2) is None
    assert "head_dim is 16" in _cuda_reason("qkv_attention", qkv, 4, None, 5, 0.2)
    assert "float32" in _cuda_reason("qkv_attention", qkv.float(), 2, None, 5, 0.2)


def test_other_support_reasons(fake):
    imgs = torch.empty(2, 3, 8, 8, device="cuda")
    ids = torch.zeros(2, 2, dtype=torch.long, device="cuda")
    assert _cuda_reason("patchify_gather", imgs, ids, 4) is None
    assert "float64" in _cuda_reason("patchify_gather", imgs.double(), ids, 4)
    weight = torch.empty(16, 3, 4, 4, dtype=torch.float16, device="cuda")
    assert "one dtype" in _cuda_reason("patch_embed_gather", imgs, ids, weight, None, None)
    assert _cuda_reason("random_masking", torch.empty(2, 1024, device="cuda"), 256) is None
    assert "patches <= 1024" in _cuda_reason("random_masking", torch.empty(2, 1025, device="cuda"), 256)
    pred, mask = torch.empty(2, 4, 48, device="cuda"), torch.ones(2, 4, device="cuda")
    assert _cuda_reason("masked_mse_loss", pred, imgs, mask, 4, True, 1e-6) is None
    assert "differentiates pred only" in _cuda_reason(
        "masked_mse_loss", pred, imgs.clone().requires_grad_(), mask, 4, True, 1e-6
    )
    x = torch.empty(2, 3, 16, device="cuda", requires_grad=True)
    ids_restore = torch.zeros(2, 5000, dtype=torch.long, device="cuda")
    token = torch.empty(16, device="cuda")
    assert "the backward of the CUDA unshuffle kernel supports patches <= 4096" in _cuda_reason(
        "unshuffle_mask_tokens", x, token, ids_restore, None
    )
    token.requires_grad_()  # the backward also runs for the mask token alone
    assert "patches <= 4096" in _cuda_reason("unshuffle_mask_tokens", x.detach(), token, ids_restore, None)
    assert _cuda_reason("unshuffle_mask_tokens", x.detach(), token.detach(), ids_restore, None) is None


# --- the compiler's register / spill report ------------------------------------------------------------

MAIN_KERNELS = (
    "attention_forward_kernel",
    "attention_backward_dkdv_kernel",
    "attention_backward_dq_kernel",
    "masked_mse_patch_kernel",
    "random_masking_kernel",
    "gather_channels_last_kernel",
    "gather_channels_first_kernel",
    "scatter_channels_last_kernel",
    "scatter_channels_first_kernel",
    "unshuffle_forward_kernel",
    "unshuffle_backward_x_kernel",
    "patchify_kernel",
    "unpatchify_kernel",
)


def _ptxas_entries() -> dict[str, tuple[int, int]]:
    """Mangled kernel name -> (registers, spill stores + loads) from build/ptxas_report.txt."""
    entries, current = {}, None
    with open(PTXAS_REPORT) as report:
        for line in report:
            if match := re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line):
                current = match.group(1)
                entries[current] = [0, 0]
            elif current and (match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
                entries[current][1] = int(match.group(1)) + int(match.group(2))
            elif current and (match := re.search(r"Used (\d+) registers", line)):
                entries[current][0] = int(match.group(1))
    return {name: tuple(value) for name, value in entries.items()}


def test_ptxas_report_covers_every_kernel_without_spills():
    assert os.path.isfile(PTXAS_REPORT), (
        f"{PTXAS_REPORT} is missing: rebuild the extension (setup.py keeps the nvcc -Xptxas=-v output there)"
    )
    entries = _ptxas_entries()
    for kernel in MAIN_KERNELS:
        found = {name: value for name, value in entries.items() if kernel in name}
        assert found, f"{kernel} is not in the ptxas report"
        for name, (registers, spills) in found.items():
            assert 0 < registers <= 255, (name, registers)
            assert spills == 0, f"{name} spills {spills} bytes"
