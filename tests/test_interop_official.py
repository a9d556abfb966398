"""from_official / to_official: the release's checkpoint formats in and out, strict checks, safe loading."""

import argparse

import pytest
import torch
from tiny_models import tiny_mae

from mae_fast.interop import from_official, to_official
from mae_fast.models import MaskedAutoencoderViT, create_model

NAME = "mae_vit_tiny_patch4_32"


def _assert_same_weights(a, b, encoder_only=False):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if encoder_only and key.startswith(("decoder_", "mask_token")):
            continue
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model(NAME, norm_pix_loss=True, backend="reference")


def _training_checkpoint(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {**to_official(model), "optimizer": optimizer.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=1e-3)}


@pytest.mark.parametrize("layout", ["wrapped", "bare", "ddp", "training"])
def test_full_round_trip_through_a_file_gives_the_same_model(tiny, layout, tmp_path):
    state = {
        "wrapped": lambda: to_official(tiny),
        "bare": lambda: to_official(tiny, wrap=False),
        "ddp": lambda: {"model": {f"module.{k}": v for k, v in to_official(tiny, wrap=False).items()}},
        "training": lambda: _training_checkpoint(tiny),
    }[layout]()
    path = tmp_path / "checkpoint.pth"
    torch.save(state, path)
    model, report = from_official(path, norm_pix_loss=True, backend="reference")
    assert type(model) is MaskedAutoencoderViT and len(model.blocks) == 6 and model.img_size == (32, 32)
    assert not report.encoder_only and report.loaded_keys == len(tiny.state_dict())
    assert str(report).startswith("official MAE checkpoint") and "all keys loaded" in str(report)
    _assert_same_weights(model, tiny)
    if layout == "wrapped":
        imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
        with torch.no_grad():
            expected, got = tiny(imgs, noise=noise), model(imgs, noise=noise)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def test_encoder_only_release_is_reported_and_the_decoder_keeps_its_init(tiny):
    state = to_official(tiny, encoder_only=True)
    assert not any(key.startswith(("decoder_", "mask_token")) for key in state["model"])
    fresh = create_model(NAME, backend="reference")
    decoder_before = fresh.decoder_pred.weight.clone()
    model, report = from_official(state, fresh)
    assert model is fresh and report.encoder_only
    assert "decoder.embed" not in str(report) and "decoder keeps its initialisation" in str(report)
    assert "decoder_pred.weight" in report.load.missing_decoder_keys
    assert torch.equal(model.decoder_pred.weight, decoder_before)
    _assert_same_weights(model, tiny, encoder_only=True)


def test_visualize_checkpoint_loads_by_name_with_pixel_loss(tiny):
    model, report = from_official(to_official(tiny), NAME, norm_pix_loss=False)
    assert not model.norm_pix_loss and not report.encoder_only
    _assert_same_weights(model, tiny)


def test_finetune_head_is_skipped_and_reported(tiny):
    state = to_official(tiny, wrap=False)
    state.update({"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)})
    _, report = from_official(state, NAME)
    assert report.ignored_keys == ["head.bias", "head.weight"] and "head.weight" in str(report)


def test_finetuned_global_pool_checkpoint_is_refused_with_a_pointer(tiny):
    state = to_official(tiny, encoder_only=True, wrap=False)
    state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    with pytest.raises(ValueError, match="fc_norm_as_norm"):
        from_official(state)


def test_custom_config_needs_head_counts():
    custom = tiny_mae()
    with pytest.raises(ValueError, match="num_heads"):
        from_official(to_official(custom))
    with pytest.raises(ValueError, match="decoder_num_heads"):
        from_official(to_official(custom), num_heads=2)
    model, _ = from_official(to_official(custom), num_heads=2, decoder_num_heads=2, backend="reference")
    assert model.blocks[0].attn.num_heads == 2 and model.decoder_blocks[0].attn.num_heads == 2
    _assert_same_weights(model, custom)


def test_strict_checks_name_the_key(tiny):
    state = to_official(tiny, wrap=False)
    bad_shape = {**state, "norm.weight": torch.ones(7)}
    with pytest.raises(ValueError, match="norm.weight"):
        from_official(bad_shape, NAME)
    unknown = {**state, "blocks.0.attn.q_norm.weight": torch.ones(64)}
    with pytest.raises(ValueError, match="q_norm"):
        from_official(unknown, NAME)
    _, report = from_official(unknown, NAME, strict=False)
    assert report.load.unexpected_keys == ["blocks.0.attn.q_norm.weight"] and "q_norm" in str(report)
    missing = {k: v for k, v in state.items() if k != "blocks.3.mlp.fc2.bias"}
    with pytest.raises(ValueError, match="blocks.3.mlp.fc2.bias"):
        from_official(missing, NAME)
    partial_decoder = {k: v for k, v in state.items() if k != "decoder_pred.bias"}
    with pytest.raises(ValueError, match="part of a decoder.*decoder_pred.bias"):
        from_official(partial_decoder, NAME)
    deeper = {**state, **{k.replace("blocks.5.", "blocks.6."): v for k, v in state.items() if "blocks.5." in k}}
    with pytest.raises(ValueError, match="matches none of the named configs"):
        from_official({k: v for k, v in deeper.items() if not k.startswith("decoder")})


_ran = []


def _mark_ran():
    _ran.append(True)


class _Payload:
    def __reduce__(self):
        return (_mark_ran, ())


def test_loading_never_runs_code_from_a_checkpoint(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 4)}, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        from_official(path)
    assert not _ran


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(FileNotFoundError):
        from_official(tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="path"):
        from_official(42)
    with pytest.raises(TypeError, match="MaskedAutoencoderViT"):
        to_official(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be"):
        from_official(to_official(tiny), model=3)
    with pytest.raises(ValueError, match="already built"):
        from_official(to_official(tiny), tiny, norm_pix_loss=True)
    with pytest.raises(ValueError, match="not tensors"):
        from_official({"model": {"cls_token": 1.0}})
    with pytest.raises(ValueError, match="no 'patch_embed.proj.weight'"):
        from_official({"cls_token": torch.zeros(1, 1, 4)})
