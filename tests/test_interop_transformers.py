"""from_transformers / to_transformers against the real transformers ViTMAE (tiny configs, no downloads)."""

import pytest
import torch

from mae_fast.interop import from_transformers, to_transformers, transformers_state_dict

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_mae, tiny_vitmae_config  # noqa: E402
from transformers import ViTMAEForPreTraining, ViTMAEModel  # noqa: E402

IMG, PATCH = 16, 4
LENGTH = (IMG // PATCH) ** 2


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _assert_same_outputs(hf, model, imgs, noise, mask_ratio=0.75):
    hf_out = hf(imgs, noise=noise)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    assert torch.equal(mask, hf_out.mask)
    assert _rel(pred, hf_out.logits) <= 1e-5
    assert _rel(loss, hf_out.loss) <= 1e-5
    return hf_out, (loss, pred, mask)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_from_transformers_gives_the_same_loss_pred_and_mask(norm_pix_loss):
    hf = ViTMAEForPreTraining(tiny_vitmae_config(norm_pix_loss=norm_pix_loss))
    model, report = from_transformers(hf, backend="reference")
    assert model.norm_pix_loss is norm_pix_loss and report.loaded_keys == len(model.state_dict())
    assert "5.x names" in str(report) and not report.encoder_only
    assert model.norm.eps == 1e-12 and model.blocks[0].norm1.eps == 1e-12 and model.decoder_norm.eps == 1e-12
    dim = 32
    attention = hf.vit.layers[1].attention
    qkv = model.blocks[1].attn.qkv.weight
    for part, linear in zip(qkv.split(dim), (attention.q_proj, attention.k_proj, attention.v_proj), strict=True):
        assert torch.equal(part, linear.weight)
    imgs, noise = torch.randn(3, 3, IMG, IMG), torch.rand(3, LENGTH)
    hf_out, (loss, _, _) = _assert_same_outputs(hf, model, imgs, noise)
    hf_out.loss.backward()
    loss.backward()
    hf_grad = torch.cat([linear.weight.grad for linear in (attention.q_proj, attention.k_proj, attention.v_proj)])
    assert _rel(model.blocks[1].attn.qkv.weight.grad, hf_grad) <= 1e-5
    assert _rel(model.decoder_pred.weight.grad, hf.decoder.decoder_pred.weight.grad) <= 1e-5


def test_to_transformers_round_trip_and_custom_eps():
    torch.manual_seed(1)
    model = tiny_mae(num_heads=4, norm_pix_loss=True, layer_norm_eps=1e-5)
    hf = to_transformers(model, mask_ratio=0.5)
    assert isinstance(hf, ViTMAEForPreTraining)
    assert hf.config.layer_norm_eps == 1e-5 and hf.config.num_attention_heads == 4 and hf.config.mask_ratio == 0.5
    assert hf.config.norm_pix_loss and hf.vit.layers[0].layernorm_before.eps == 1e-5
    imgs, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, LENGTH)
    with torch.no_grad():
        _assert_same_outputs(hf, model, imgs, noise, mask_ratio=0.5)
    back, _ = from_transformers(hf, backend="reference")
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_transformers_4x_names_and_saved_directories(tmp_path):
    hf = ViTMAEForPreTraining(tiny_vitmae_config(layer_norm_eps=1e-6))
    model, _ = from_transformers(hf, backend="reference")
    old = transformers_state_dict(model, version=4)
    assert "vit.encoder.layer.1.attention.attention.value.bias" in old
    assert "decoder.decoder_layers.0.intermediate.dense.weight" in old
    converted, report = from_transformers(old, config=hf.config.to_dict(), backend="reference")
    assert "4.x names" in str(report)
    hf.save_pretrained(tmp_path)
    saved, _ = from_transformers(tmp_path, backend="reference")
    imgs, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, LENGTH)
    with torch.no_grad():
        for candidate in (converted, saved):
            _assert_same_outputs(hf, candidate, imgs, noise)


def test_encoder_only_vitmae_model():
    config = tiny_vitmae_config()
    encoder = ViTMAEModel(config)
    model, report = from_transformers(encoder, backend="reference")
    assert report.encoder_only
    imgs, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, LENGTH)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
        out = encoder(imgs, noise=noise)
    assert torch.equal(mask, out.mask) and _rel(latent, out.last_hidden_state) <= 1e-5


def test_refusals_name_the_problem():
    hf = ViTMAEForPreTraining(tiny_vitmae_config())
    partial = {key: getattr(hf.config, key) for key in ("hidden_size", "intermediate_size", "image_size")}
    partial.update(patch_size=PATCH, num_hidden_layers=2, num_attention_heads=2, decoder_hidden_size=16)
    partial.update(decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64)
    model, _ = from_transformers(hf.state_dict(), config=partial)
    assert model.norm.eps == 1e-12  # ViTMAEConfig's default fills what the dict lacks
    with pytest.raises(ValueError, match="config is required"):
        from_transformers(hf.state_dict())
    with pytest.raises(ValueError, match="hidden_act"):
        from_transformers(hf.state_dict(), config=tiny_vitmae_config(hidden_act="gelu_new"))
    with pytest.raises(ValueError, match="MLP ratio"):
        from_transformers(hf.state_dict(), config=tiny_vitmae_config(decoder_intermediate_size=32))
    with pytest.raises(ValueError, match="not a ViTMAE state_dict"):
        from_transformers({"cls_token": torch.zeros(1, 1, 32)}, config=tiny_vitmae_config())
    extra = {**hf.state_dict(), "vit.pooler.dense.weight": torch.zeros(32, 32)}
    with pytest.raises(ValueError, match="vit.pooler.dense.weight"):
        from_transformers(extra, config=tiny_vitmae_config())
    with pytest.raises(ValueError, match="version"):
        transformers_state_dict(from_transformers(hf)[0], version=3)
    with pytest.raises(ValueError, match="config.num_hidden_layers|shape"):
        from_transformers(hf.state_dict(), config=tiny_vitmae_config(hidden_size=64, intermediate_size=256))
