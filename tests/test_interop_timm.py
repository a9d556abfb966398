"""to_timm / timm_vit / from_timm against real timm VisionTransformers (tiny, pretrained=False)."""

import pytest
import torch

from mae_fast.interop import from_timm, timm_vit, to_timm

pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from tiny_models import TINY_DECODER, tiny_mae, tiny_timm_vit  # noqa: E402

DECODER = dict(**TINY_DECODER, backend="reference")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_timm_weights_into_mae_fast_give_the_same_features():
    vit = tiny_timm_vit()
    model, report = from_timm(vit, **DECODER)
    assert report.encoder_only and report.ignored_keys == ["head.bias", "head.weight"]
    assert "decoder keeps its initialisation" in str(report)
    assert model.blocks[0].attn.num_heads == 2 and model.norm.eps == vit.norm.eps
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _close(model.encode(imgs), vit.forward_features(imgs))


def test_mae_fast_encoder_into_timm_gives_the_same_features():
    torch.manual_seed(3)
    model = tiny_mae(layer_norm_eps=1e-12, mlp_ratio=2.0)
    vit = timm_vit(model, num_classes=7).eval()
    assert vit.norm.eps == 1e-12 and vit.blocks[0].mlp.fc1.out_features == 64
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = vit.forward_features(imgs)
        _close(features, model.encode(imgs))
        assert vit.forward_head(features).shape == (2, 7)
    state = to_timm(model)
    assert not any(key.startswith(("decoder", "mask_token")) for key in state)
    back, _ = from_timm(state, num_heads=2, layer_norm_eps=1e-12, mlp_ratio=2.0, **DECODER)
    for key, value in state.items():
        assert torch.equal(back.state_dict()[key], value), key


def test_global_pool_layout_for_finetuning():
    model = tiny_mae()
    state = to_timm(model, global_pool=True)
    assert "norm.weight" not in state and torch.equal(state["fc_norm.weight"], torch.ones(32))
    vit = timm_vit(model, global_pool=True).eval()
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = vit.forward_features(imgs)  # no final norm: fc_norm comes after average pooling
        _close(model.norm(features), model.encode(imgs))
        pooled = vit.forward_head(features, pre_logits=True)
        _close(pooled, torch.nn.functional.layer_norm(features[:, 1:].mean(1), (32,), eps=1e-6))
    with pytest.raises(ValueError, match="fc_norm_as_norm"):
        from_timm(vit, **DECODER)
    loaded, report = from_timm(vit, fc_norm_as_norm=True, **DECODER)
    assert torch.equal(loaded.norm.weight, torch.ones(32)) and "fc_norm loaded" in str(report)


def test_named_config_is_matched_from_a_state_dict():
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=0)
    model, _ = from_timm(vit.state_dict(), backend="reference")
    assert len(model.decoder_blocks) == 2 and model.decoder_embed.out_features == 128  # mae_vit_tiny_patch4_32
    with pytest.raises(ValueError, match="num_heads"):
        from_timm(tiny_timm_vit().state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reg_tokens=1), "register tokens"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(init_values=1e-5), "layer scale"),
        (dict(pre_norm=True), "pre_norm"),
        (dict(act_layer="gelu_tanh"), "GELU"),
    ],
)
def test_timm_variants_an_mae_cannot_reproduce_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        from_timm(tiny_timm_vit(**kwargs), **DECODER)


def test_bad_arguments():
    with pytest.raises(TypeError, match="VisionTransformer"):
        from_timm(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="MaskedAutoencoderViT"):
        to_timm(tiny_timm_vit())
    with pytest.raises(ValueError, match="num_classes"):
        timm_vit(tiny_mae(), num_classes=-1)
    state = {**to_timm(tiny_mae()), "mask_token": torch.zeros(1, 1, 16)}
    with pytest.raises(ValueError, match="from_official"):
        from_timm(state, num_heads=2)
