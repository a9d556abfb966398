"""The model reaches every CUDA kernel: routing on fake CUDA tensors, and training on the emulated kernels.

(a) Under FakeTensorMode, a model built on fake CUDA tensors resolves every op of its forward to the "cuda"
    backend, for backend="cuda" and for "auto", with a fixed mask ratio and with per-sample ratios (packed
    attention), under bf16 autocast. No GPU is needed; the extension must be built.
(b) The CUDA backend's own dispatch code, run on the CPU emulation of csrc/ (tests/cuda_emulation), trains a
    tiny model a few steps with the weights of the same model trained on the reference backend, within
    bf16 tolerance. A pass says the routing and the kernels' logic are right; nothing about GPU speed.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil

import pytest
import torch
from cuda_emulation import build as emulation
from torch._subclasses.fake_tensor import FakeTensorMode

from mae_fast import _extension, dispatch
from mae_fast.backends.cuda import _library as cuda_library
from mae_fast.models import create_model

if torch.version.cuda is None:
    pytest.skip("torch is a CPU-only build: the CUDA extension cannot be built", allow_module_level=True)

TINY = dict(depth=2, embed_dim=64, num_heads=2, decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2)
CUDA_OP_MODULES = ("patchify", "patch_embed", "unshuffle", "loss", "masking", "attention")


@pytest.fixture
def resolved():
    """The (op, backend) of every op the test resolves (dispatch.recording)."""
    with dispatch.recording() as picks:
        yield picks


@pytest.mark.parametrize("backend", ["cuda", "auto"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["fixed_ratio", "per_sample_ratios"])
@pytest.mark.parametrize("return_pred", [True, False], ids=["with_pred", "training_loss_only"])
def test_forward_on_fake_cuda_tensors_resolves_every_op_to_cuda(resolved, backend, per_sample, return_pred):
    assert _extension.available(), _extension.unavailable_reason()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with FakeTensorMode(), torch.device("cuda"):
            model = create_model("mae_vit_tiny_patch4_32", backend=backend, **TINY)
    finally:
        torch.set_default_dtype(previous)
    ratio = torch.tensor([0.5, 0.75, 0.6, 0.9]) if per_sample else 0.75  # read on the host, as on a GPU
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        imgs = torch.randn(4, 3, 32, 32, dtype=torch.bfloat16)
        loss, pred, mask = model(imgs, ratio, return_pred=return_pred)
    assert loss.shape == () and (pred.shape == (4, 64, 48) if return_pred else pred is None)
    ops = {op for op, _ in resolved}
    assert {"patch_embed_gather", "qkv_attention", "unshuffle_mask_tokens", "masked_mse_loss"} <= ops
    assert "random_masking" in ops or per_sample
    assert all(chosen == "cuda" for _, chosen in resolved), sorted(set(resolved))


@pytest.fixture(scope="module")
def emulated_namespace():
    if shutil.which("c++") is None:
        pytest.skip("no host C++ compiler: the CUDA emulation cannot be built (these tests did NOT run)")
    if not os.path.isfile(os.path.join(emulation.cuda_include_dir(), "cuda_runtime.h")):
        pytest.skip("no CUDA headers (set CUDA_HOME): the CUDA emulation cannot be built (these tests did NOT run)")
    cuda_library.install("mae_fast_emu", "CPU")
    emulation.build()
    return torch.ops.mae_fast_emu


@pytest.fixture
def cuda_backend_on_the_emulation(emulated_namespace, monkeypatch):
    """The "cuda" backend's implementations, unchanged, calling the emulated kernels on CPU tensors."""
    for name in CUDA_OP_MODULES:
        monkeypatch.setattr(importlib.import_module(f"mae_fast.backends.cuda.{name}"), "OPS", emulated_namespace)
    for op in dispatch.ops():
        implementations = dispatch._ops[op].implementations
        impl = implementations.get("cuda")
        if impl is None:  # an op the CUDA backend does not implement (resized_crop) is not in the model step
            continue
        on_cpu = dataclasses.replace(impl.support, devices=("cpu",), min_capability=None)
        monkeypatch.setitem(implementations, "cuda", dispatch.Implementation(impl.fn, on_cpu))


def _train(backend: str, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of ``steps`` AdamW steps under bf16 autocast, and the gradients of the first step."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4_32", backend=backend, **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    losses, first_grads = [], {}
    for _ in range(steps):
        imgs = torch.randn(2, 3, 32, 32, generator=generator)
        noise = torch.rand(2, model.num_patches, generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(imgs, 0.75, noise=noise)[0]
        optimizer.zero_grad()
        loss.backward()
        first_grads = first_grads or {
            name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
        }
        optimizer.step()
        losses.append(loss.item())
    return losses, first_grads


def test_emulated_cuda_kernels_train_a_tiny_model_like_the_reference(cuda_backend_on_the_emulation, resolved):
    """Same losses step by step and same first gradients, within bf16 rounding (both runs compute in bf16
    under autocast; they differ in where they round, so the criterion is relative to each gradient's size)."""
    losses, grads = _train("cuda", steps=3)
    assert {chosen for _, chosen in resolved} == {"cuda"}
    assert {op for op, _ in resolved} >= {"qkv_attention", "patch_embed_gather", "masked_mse_loss"}
    exact_losses, exact_grads = _train("reference", steps=3)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(exact_losses), rtol=2e-2, atol=0)
    assert grads.keys() == exact_grads.keys()
    for name, grad in grads.items():
        scale = exact_grads[name].abs().max().item()
        error = (grad - exact_grads[name]).abs().max().item()
        assert error <= 5e-2 * scale, f"{name}: gradient off by {error:.3g}, {error / scale:.3g} of its largest value"


@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "packed"])
@pytest.mark.parametrize("head_dim", [32, 80])
def test_emulated_qkv_attention_equals_visible_attention_on_its_views(emulated_namespace, packed, head_dim):
    """The qkv primitives run the visible_attention kernels on strided views of qkv and write dq, dk, dv into
    one dqkv buffer: bit for bit the visible_attention primitives' results (those are checked against fp32
    in tests/ops/test_attention.py)."""
    emu, heads = emulated_namespace, 2
    shape = (23, 3 * heads * head_dim) if packed else (2, 11, 3 * heads * head_dim)
    cu = torch.tensor([0, 9, 9, 23], dtype=torch.int32) if packed else None
    qkv = torch.randn(shape).to(torch.bfloat16)
    out, lse = emu.qkv_attention(qkv, heads, cu, 14 if packed else 11, 0.2)
    q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).unbind(-3)
    expected_out, expected_lse = emu.visible_attention(q, k, v, cu, 14 if packed else 11, 0.2)
    assert torch.equal(out, expected_out.flatten(-2)) and torch.equal(lse, expected_lse)
    grad = torch.randn(out.shape).to(torch.bfloat16)
    dqkv = emu.qkv_attention_backward(grad, qkv, lse, heads, cu, 14 if packed else 11, 0.2)
    dq, dk, dv = emu.visible_attention_backward(
        grad.unflatten(-1, (heads, head_dim)), q, k, v, lse, cu, 14 if packed else 11, 0.2
    )
    assert torch.equal(dqkv, torch.stack([dq, dk, dv], dim=-3).flatten(-3))


def test_emulated_qkv_primitives_agree_with_their_fakes_and_formula(emulated_namespace):
    qkv = torch.randn(2, 9, 3 * 2 * 32).to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(emulated_namespace.qkv_attention, (qkv, 2, None, 9, 0.2))
    packed = torch.randn(13, 3 * 2 * 32).to(torch.bfloat16).requires_grad_()
    cu = torch.tensor([0, 4, 13], dtype=torch.int32)
    torch.library.opcheck(emulated_namespace.qkv_attention, (packed, 2, cu, 9, 0.2))
