"""mae_fast.patch on real timm and transformers ViTs: same outputs, same weights, training, refusals."""

import copy

import pytest
import torch
from torch import nn

import mae_fast
from mae_fast.interop import TimmAttention, TransformersAttention

pytest.importorskip("timm")
from tiny_models import TINY_ENCODER, tiny_mae, tiny_timm_vit, tiny_vitmae_config  # noqa: E402

IMG = TINY_ENCODER["img_size"]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def attention_calls(monkeypatch):
    """(batch, tokens) of every attention op mae_fast dispatches: proof that the patched modules run mae_fast."""
    calls = []
    original = mae_fast.dispatch.dispatch

    def counting(op, *args, **kwargs):
        if op in ("visible_attention", "qkv_attention"):
            calls.append(tuple(args[0].shape[:2]))
        return original(op, *args, **kwargs)

    monkeypatch.setattr(mae_fast.dispatch, "dispatch", counting)
    return calls


def test_timm_vit_patched_gives_equal_logits_and_keeps_its_weights(attention_calls):
    vit = tiny_timm_vit()
    reference = copy.deepcopy(vit)
    before = dict(vit.named_parameters())
    imgs = torch.randn(2, 3, IMG, IMG)
    report = mae_fast.patch(vit, backend="reference")
    assert [path for path, _, _ in report.replaced] == ["blocks.0.attn", "blocks.1.attn"] and not report.skipped
    assert len(report) == 2 and "TimmAttention" in str(report)
    assert all(type(block.attn) is TimmAttention for block in vit.blocks)
    after = dict(vit.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # same Parameter objects
    with torch.no_grad():
        _close(vit(imgs), reference(imgs))
        assert attention_calls == [(2, 17)] * 2
        mask = torch.rand(vit.patch_embed.num_patches + 1, vit.patch_embed.num_patches + 1) > 0.3
        mask.fill_diagonal_(True)
        _close(vit.forward_features(imgs, attn_mask=mask), reference.forward_features(imgs, attn_mask=mask))
    assert len(attention_calls) == 2  # masks take the scaled_dot_product_attention fallback
    again = mae_fast.patch(vit)
    assert not again.replaced and not again.skipped


def test_training_works_after_patching_with_an_optimizer_made_before():
    vit = tiny_timm_vit().train()
    reference = copy.deepcopy(vit)
    optimizer = torch.optim.SGD(vit.parameters(), lr=0.1)
    mae_fast.patch(vit, backend="reference")
    imgs, labels = torch.randn(4, 3, IMG, IMG), torch.randint(0, 5, (4,))
    for model in (vit, reference):
        nn.functional.cross_entropy(model(imgs), labels).backward()
    for (name, p), q in zip(vit.named_parameters(), reference.parameters(), strict=True):
        _close(p.grad, q.grad)
        assert p.grad.abs().sum() > 0, name
    weight = vit.blocks[0].attn.qkv.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, weight)


def _assert_bf16_error_within_twice_timms_own(vit, imgs, backend):
    """Patched on ``backend`` and run in bf16, ``vit`` is off its float32 output by at most twice what timm's
    own bf16 run is."""
    with torch.no_grad():
        exact = vit(imgs)
        plain = vit.to(torch.bfloat16)(imgs.bfloat16()).float()
        mae_fast.patch(vit, backend=backend)
        patched = vit(imgs.bfloat16()).float()
    assert (patched - exact).abs().max() <= 2 * (plain - exact).abs().max()


def test_bf16_error_is_within_twice_timms_own():
    _assert_bf16_error_within_twice_timms_own(tiny_timm_vit(), torch.randn(2, 3, IMG, IMG), "reference")


@pytest.mark.parametrize(
    "kwargs, reason", [(dict(qk_norm=True), "qk_norm"), (dict(attn_drop_rate=0.1), "attention dropout p=0.1")]
)
def test_unpatchable_timm_attention_is_left_alone_and_reported(kwargs, reason):
    vit = tiny_timm_vit(**kwargs)
    report = mae_fast.patch(vit)
    assert not report.replaced and [detail for _, _, detail in report.skipped] == [reason, reason]
    assert all(type(block.attn).__name__ == "Attention" for block in vit.blocks)


def test_unknown_attention_classes_and_mae_fast_models_are_left_alone():
    class MyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

    holder = nn.Sequential(nn.Linear(4, 4), MyAttention())
    report = mae_fast.patch(holder)
    assert not report.replaced and [(p, d) for p, _, d in report.skipped] == [("1", "unknown attention class")]
    report = mae_fast.patch(tiny_mae())
    assert not report.replaced and not report.skipped
    with pytest.raises(TypeError, match="nn.Module"):
        mae_fast.patch("vit")
    with pytest.raises(ValueError, match="backend"):
        mae_fast.patch(holder, backend="fast")


def _transformers():
    """transformers, imported by the tests that need it (the GPU machine may have timm only)."""
    return pytest.importorskip("transformers")


def test_transformers_vitmae_patched_gives_the_same_loss_and_trains(attention_calls):
    hf = _transformers().ViTMAEForPreTraining(tiny_vitmae_config(norm_pix_loss=True))
    reference = copy.deepcopy(hf)
    keys = list(hf.state_dict())
    report = mae_fast.patch(hf, backend="reference")
    replaced = [path for path, _, _ in report.replaced]
    assert replaced == ["vit.layers.0.attention", "vit.layers.1.attention", "decoder.decoder_layers.0.attention"]
    assert type(hf.vit.layers[0].attention) is TransformersAttention and list(hf.state_dict()) == keys
    imgs, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, 16)
    out, expected = hf(imgs, noise=noise), reference(imgs, noise=noise)
    assert attention_calls == [(2, 5)] * 2 + [(2, 17)]  # visible tokens only in the encoder
    assert torch.equal(out.mask, expected.mask)
    _close(out.logits, expected.logits)
    _close(out.loss, expected.loss)
    out.loss.backward()
    expected.loss.backward()
    _close(hf.vit.layers[0].attention.q_proj.weight.grad, reference.vit.layers[0].attention.q_proj.weight.grad)


def test_transformers_vit_classifier_patched_and_dropout_refused():
    transformers = _transformers()
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMG, patch_size=4
    )
    hf = transformers.ViTForImageClassification(config).eval()
    reference = copy.deepcopy(hf)
    report = mae_fast.patch(hf, backend="reference")
    assert len(report) == 2 and not report.skipped
    imgs = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        _close(hf(imgs).logits, reference(imgs).logits)
    dropped = transformers.ViTMAEForPreTraining(
        tiny_vitmae_config(norm_pix_loss=True, attention_probs_dropout_prob=0.1)
    )
    report = mae_fast.patch(dropped)
    assert not report.replaced and len(report.skipped) == 3 and "attention dropout p=0.1" in str(report)
    older = transformers.ViTMAEForPreTraining(tiny_vitmae_config(norm_pix_loss=True))
    del older.vit.layers[0].attention.q_proj  # what a 4.x-style module (query/key/value) lacks
    report = mae_fast.patch(older)
    assert report.skipped[0][0] == "vit.layers.0.attention" and "5.x layout" in report.skipped[0][2]
    assert len(report.replaced) == 2


@pytest.mark.gpu
def test_patched_timm_vit_on_the_gpu_bf16():
    vit = tiny_timm_vit(img_size=64, embed_dim=128, num_heads=2, depth=2).cuda()
    _assert_bf16_error_within_twice_timms_own(vit, torch.randn(4, 3, 64, 64, device="cuda"), "auto")
