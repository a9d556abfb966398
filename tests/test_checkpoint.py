"""load_checkpoint: release layouts (full, encoder-only, wrapped, file), mismatches named by key; unreadable
files named by every reader; the release's argparse.Namespace allowed, no other code."""

import argparse
import fractions
import os

import pytest
import torch
from tiny_models import tiny_mae

from mae_fast import models
from mae_fast.interop import from_official
from mae_fast.models.checkpoint import CheckpointReadError
from mae_fast.train.runmodel import model_from_checkpoint


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
    with pytest.raises(ValueError, match="is not a readable mae_fast/release checkpoint: it needs print to unpickle"):
        models.load_checkpoint(_tiny(), path)


def _corrupt(path, kind: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write({"empty": b"", "truncated": data[: len(data) // 2], "random": os.urandom(4096)}[kind])


@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
def test_every_reader_names_an_unreadable_checkpoint(tmp_path, kind):
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"model": _tiny().state_dict()}, path)
    _corrupt(path, kind)
    message = f"{path} is not a readable mae_fast/release checkpoint: "

    def load_into_tiny(p):
        return models.load_checkpoint(_tiny(), p)

    for reader in (models.read_state_dict, load_into_tiny, model_from_checkpoint, from_official):
        with pytest.raises(CheckpointReadError, match=message.replace(".", r"\.")):
            reader(path)


def test_release_training_checkpoint_with_namespace_args_loads(tmp_path):
    """The release's training checkpoints: 'args' is an argparse.Namespace, plus optimizer and epoch."""
    model = _tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    path = str(tmp_path / "checkpoint-799.pth")
    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=224, mask_ratio=0.75, norm_pix_loss=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 799, "args": args}, path)
    target = _tiny()
    assert str(models.load_checkpoint(target, path)) == "all keys loaded"
    torch.testing.assert_close(target.state_dict(), model.state_dict(), rtol=0, atol=0)
    converted, _ = from_official(path, model=_tiny())
    torch.testing.assert_close(converted.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_a_folder_or_a_non_dict_is_named(tmp_path):
    with pytest.raises(CheckpointReadError, match="not a regular file"):
        models.read_state_dict(tmp_path)
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointReadError, match="list.pth is not a readable .*: it holds a list, not a dict"):
        models.read_state_dict(tmp_path / "list.pth")


def test_a_pickle_needing_other_code_is_still_refused(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"model": _tiny().state_dict(), "args": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointReadError, match="needs fractions.Fraction to unpickle"):
        models.read_state_dict(path)
