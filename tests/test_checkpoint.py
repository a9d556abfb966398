"""load_checkpoint: release layouts (full, encoder-only, wrapped, file), mismatches named by key."""

import pytest
import torch
from tiny_models import tiny_mae

from mae_fast import models


def _tiny(**overrides):
    """The suite's tiny MAE with one 4-head encoder block."""
    return tiny_mae(**{"depth": 1, "num_heads": 4, **overrides})


def test_full_checkpoint_file_wrapped_like_the_release(tmp_path):
    source = _tiny()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    target = _tiny()
    report = models.load_checkpoint(target, path)
    assert not report.missing_encoder_keys and not report.missing_decoder_keys and not report.unexpected_keys
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)
    assert str(report) == "all keys loaded"


def test_bare_state_dict_loads():
    source = _tiny()
    target = _tiny()
    models.load_checkpoint(target, source.state_dict())
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_encoder_only_release_is_reported_not_fatal():
    source = _tiny()
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    target = _tiny()
    decoder_before = target.decoder_pred.weight.clone()
    report = models.load_checkpoint(target, {"model": encoder})
    assert report.encoder_only
    assert "decoder_pred.weight" in report.missing_decoder_keys and "mask_token" in report.missing_decoder_keys
    assert "decoder keys missing" in str(report)
    torch.testing.assert_close(target.decoder_pred.weight, decoder_before, rtol=0, atol=0)
    torch.testing.assert_close(target.norm.weight, source.norm.weight)


def test_shape_mismatch_names_the_key():
    source = _tiny(embed_dim=64)
    with pytest.raises(ValueError, match="'cls_token' has shape \\(1, 1, 64\\), the model expects \\(1, 1, 32\\)"):
        models.load_checkpoint(_tiny(), source.state_dict())


def test_missing_encoder_keys_and_unexpected_keys():
    state = _tiny().state_dict()
    del state["norm.weight"]
    with pytest.raises(ValueError, match="norm.weight"):
        models.load_checkpoint(_tiny(), state)
    report = models.load_checkpoint(_tiny(), state, strict_encoder=False)
    assert report.missing_encoder_keys == ["norm.weight"]
    state = _tiny().state_dict()
    state["head.weight"] = torch.zeros(3)
    assert models.load_checkpoint(_tiny(), state).unexpected_keys == ["head.weight"]


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        models.load_checkpoint(_tiny(), tmp_path / "nope.pth")
    with pytest.raises(TypeError, match="path_or_state"):
        models.load_checkpoint(_tiny(), 42)
    with pytest.raises(ValueError, match="not tensors"):
        models.load_checkpoint(_tiny(), {"model": {"cls_token": [1, 2]}})


def test_checkpoint_cannot_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        models.load_checkpoint(_tiny(), path)
