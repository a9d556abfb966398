"""mae_fast.nn.Attention / Block: drop-in for timm's ViT block, Triton attention vs the reference, packed
sequences, torch.compile(fullgraph=True)."""

import pytest
import torch
from timm.models.vision_transformer import Block as TimmBlock
from tiny_models import tiny_mae

from mae_fast.nn import Attention, Block

TOL = dict(atol=2e-5, rtol=2e-5)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}


def _run(module, x, *args):
    module.zero_grad()
    leaf = x.detach().clone().requires_grad_()
    out = module(leaf, *args)
    out.backward(torch.ones_like(out) + out.detach())
    return out.detach(), leaf.grad, _grads(module)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_loads_timm_weights_and_matches_timm(device, backend):
    dim, heads = 64, 4
    timm_block = TimmBlock(dim, heads, mlp_ratio=4.0, qkv_bias=True).to(device)
    block = Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, backend=backend).to(device)
    assert set(block.state_dict()) == set(timm_block.state_dict())
    block.load_state_dict(timm_block.state_dict(), strict=True)
    x = torch.randn(2, 50, dim, device=device)
    expected = _run(timm_block, x)
    got = _run(block, x)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1], expected[1], **TOL)
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_attention_triton_equals_reference_fixed_and_packed(device):
    torch.manual_seed(0)
    attn = Attention(96, num_heads=3).to(device)  # head dim 32
    x = torch.randn(2, 33, 96, device=device)
    lengths = [1, 33, 12]
    cu = torch.tensor([0, 1, 34, 46], dtype=torch.int32, device=device)
    packed = torch.randn(sum(lengths), 96, device=device)
    for inputs in ((x,), (packed, cu, 33)):
        results = {}
        for backend in ("reference", "triton"):
            attn.backend = backend
            results[backend] = _run(attn, *inputs)
        ref, tri = results["reference"], results["triton"]
        torch.testing.assert_close(tri[0], ref[0], **TOL)
        torch.testing.assert_close(tri[1], ref[1], **TOL)
        for name in ref[2]:
            torch.testing.assert_close(tri[2][name], ref[2][name], **TOL)


def test_packed_block_equals_each_sequence_alone(device):
    block = Block(64, 2, backend="triton").to(device)
    lengths = [5, 1, 17]
    seqs = [torch.randn(n, 64, device=device) for n in lengths]
    cu = torch.tensor([0, 5, 6, 23], dtype=torch.int32, device=device)
    packed = block(torch.cat(seqs), cu, max(lengths))
    alone = torch.cat([block(s[None])[0] for s in seqs])
    torch.testing.assert_close(packed, alone, **TOL)


def test_block_compiles_fullgraph_and_matches_eager(device):
    """torch.compile(fullgraph=True) traces the custom op without a graph break. On the CPU the Triton
    kernels run in the interpreter, which inductor cannot compile around, so the CPU run uses aot_eager
    (dynamo + AOT autograd with the fake implementations); a GPU run uses inductor."""
    block = Block(64, 2, backend="triton").to(device)
    compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    x = torch.randn(2, 50, 64, device=device)
    eager = _run(block, x)
    traced = _run(compiled, x)
    torch.testing.assert_close(traced[0], eager[0], **TOL)
    torch.testing.assert_close(traced[1], eager[1], **TOL)
    traced_grads = {name.removeprefix("_orig_mod."): grad for name, grad in traced[2].items()}
    assert set(traced_grads) == set(eager[2])
    for name, grad in eager[2].items():
        torch.testing.assert_close(traced_grads[name], grad, **TOL)


def test_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(10, num_heads=3)


def test_model_with_triton_attention_equals_reference(device):
    """MAE model parity (loss, pred, every gradient) with only the attention on the Triton backend: the other
    ops' Triton backends are tested in their own files."""
    model = tiny_mae(img_size=32, patch_size=8, embed_dim=64, depth=1, decoder_embed_dim=32, norm_pix_loss=True)
    model.to(device)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    noise = torch.rand(2, 16, device=device)
    results = {}
    for backend in ("reference", "triton"):
        for module in model.modules():
            if isinstance(module, Attention):
                module.backend = backend
        model.zero_grad()
        loss, pred, mask = model(imgs, 0.75, noise)
        loss.backward()
        results[backend] = (loss.detach(), pred.detach(), mask, _grads(model))
    ref, tri = results["reference"], results["triton"]
    for a, b in zip(tri[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for name, grad in ref[3].items():
        torch.testing.assert_close(tri[3][name], grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
