"""The release's linear probe as a mode of mae-fast finetune: its settings, the BN + Linear head on the
frozen encoder's cls token, timm's LARS, the batch capped by small data, an exact resume, the export."""

from __future__ import annotations

import os

import pytest
import torch
from timm.optim import Lars
from torch import nn
from train_helpers import make_split_image_folder

from mae_fast.models import create_model
from mae_fast.train import finetune as finetune_module
from mae_fast.train.finetune import FinetuneConfig, build_optimizer, evaluate_checkpoint, finetune

TINY_ENCODER = dict(embed_dim=32, depth=2, num_heads=4)


@pytest.fixture
def pretrained(tmp_path) -> tuple[str, dict]:
    """An encoder-only file in the release's layout, and its weights."""
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch4_32", img_size=16, **TINY_ENCODER)
    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))}
    path = str(tmp_path / "mae_pretrain_vit_tiny.pth")
    torch.save({"model": encoder}, path)
    return path, encoder


def probe_config(tmp_path, name, pretrained_path, **overrides) -> FinetuneConfig:
    values = dict(
        linprobe=True, pretrained=pretrained_path, model="vit_tiny_patch4_32", model_kwargs=TINY_ENCODER,
        data="imagefolder", data_path=str(tmp_path / "data"), img_size=16, epochs=3, batch_size=4,
        warmup_epochs=1.0, num_workers=0, eval_batch_size=4, log_every=1, output_dir=str(tmp_path / name),
        progress=False,
    )  # fmt: skip
    if not os.path.isdir(tmp_path / "data"):
        make_split_image_folder(tmp_path / "data", 8, 3, 20, 24)
    return FinetuneConfig.from_dict({**values, **overrides}).validate()


def test_the_release_settings_and_a_size_preset():
    config = FinetuneConfig.from_dict({"linprobe": True, "data": "fashion-mnist"})
    assert (config.blr, config.batch_size, config.epochs, config.warmup_epochs) == (0.1, 16384, 90, 10.0)
    assert (config.weight_decay, config.min_lr, config.global_pool, config.drop_path) == (0.0, 0.0, False, 0.0)
    assert (config.mixup, config.cutmix, config.aa, config.reprob, config.smoothing) == (0.0, 0.0, None, 0.0, 0.0)
    assert config.peak_lr == pytest.approx(0.1 * 16384 / 256)
    # a size preset gives the model; the probe's recipe replaces its fine-tuning numbers; flags win over both
    sized = FinetuneConfig.from_dict({"linprobe": True, "preset": "vit_l", "epochs": 5, "data": "fashion-mnist"})
    assert (sized.model, sized.blr, sized.drop_path, sized.epochs) == ("vit_large_patch16", 0.1, 0.0, 5)


@pytest.mark.parametrize(
    ("overrides", "word"),
    [(dict(mixup=0.8), "mixup"), (dict(cutmix=1.0), "cutmix"), (dict(drop_path=0.1), "drop_path"),
     (dict(reprob=0.25), "reprob"), (dict(aa="rand-m9-mstd0.5-inc1"), "aa"), (dict(linprobe="yes"), "linprobe")],
)  # fmt: skip
def test_settings_the_probe_does_not_use_are_refused_by_name(overrides, word):
    with pytest.raises(ValueError, match=rf"^{word}"):
        FinetuneConfig.from_dict({"linprobe": True, "data": "fashion-mnist", **overrides}).validate()


def test_the_batch_is_capped_by_the_training_split():
    config = FinetuneConfig.from_dict({"linprobe": True, "data": "fashion-mnist", "accum_steps": 4})
    capped = config.capped_to(1002)
    assert capped.batch_size == 1000 and capped.peak_lr == pytest.approx(0.1 * 1000 / 256)
    assert config.capped_to(20_000) is config
    plain = FinetuneConfig(data="fashion-mnist")
    assert plain.capped_to(10) is plain  # fine-tuning keeps refusing a batch above the data (build_data)
    with pytest.raises(ValueError, match="batch_size: 3 training image"):
        config.capped_to(3)


def test_head_optimizer_and_frozen_encoder(tmp_path, pretrained, capsys):
    path, encoder = pretrained
    config = probe_config(tmp_path, "run", path, batch_size=64, epochs=2)  # 16 training images
    result = finetune(config)
    assert "batch_size 64 capped at 16" in capsys.readouterr().out
    assert result.step == 2 and result.final["count"] == 6  # one step per epoch at the capped batch
    state = torch.load(result.export, weights_only=True)
    assert state["args"]["batch_size"] == 16 and state["args"]["linprobe"] is True
    trained = state["model"]
    for name, value in encoder.items():  # the encoder is the pretrained one, bit for bit
        if name in trained:
            assert torch.equal(trained[name], value), name
    assert {"norm.weight", "blocks.1.mlp.fc2.weight", "pos_embed"} <= trained.keys() & encoder.keys()
    assert {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"} <= trained.keys()
    assert "head.0.weight" not in trained  # BatchNorm1d(affine=False)
    assert not torch.equal(trained["head.0.running_mean"], torch.zeros(32))  # the BN statistics trained

    model, _ = finetune_module.build_classifier(config, 2, 3)
    finetune_module.prepare_linear_probe(model, config.seed)
    bn, linear = model.head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert 0.005 < float(linear.weight.detach().std()) < 0.02 and not linear.bias.any()  # trunc_normal(std 0.01)
    assert not model.global_pool  # the cls token (after the pretrained norm) is the feature
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, Lars)
    weight_group, bias_group = optimizer.param_groups
    assert weight_group["params"] == [linear.weight] and weight_group["always_adapt"]
    assert bias_group["params"] == [linear.bias] and not bias_group["always_adapt"]
    assert all(g["momentum"] == 0.9 and g["trust_coeff"] == 0.001 and g["weight_decay"] == 0 for g in (
        weight_group, bias_group))  # fmt: skip

    scores = evaluate_checkpoint(result.export, config)  # the export rebuilds the probe head
    assert scores["acc1"] == pytest.approx(result.final["acc1"])


def test_resume_is_bit_exact(tmp_path, pretrained):
    path, _ = pretrained
    full = finetune(probe_config(tmp_path, "full", path))  # 4 steps per epoch, 3 epochs
    part = finetune(probe_config(tmp_path, "part", path, max_steps=6))
    assert part.step == 6 and part.export is None
    resumed = finetune(probe_config(tmp_path, "part", path, resume="auto"))
    assert full.step == resumed.step == 12
    a = torch.load(full.export, weights_only=True)["model"]
    b = torch.load(resumed.export, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.history == resumed.history
    with pytest.raises(ValueError, match="resume: .*linprobe"):
        finetune(probe_config(tmp_path, "part", path, resume="auto", linprobe=False, global_pool=False))


def test_a_checkpoint_from_before_the_probe_setting_still_resumes():
    saved = FinetuneConfig(data="fashion-mnist").to_dict()
    del saved["linprobe"]
    finetune_module._check_resume(saved, FinetuneConfig(data="fashion-mnist").to_dict())
    with pytest.raises(ValueError, match="linprobe: False -> True"):
        finetune_module._check_resume(saved, {**saved, "linprobe": True})


def test_cli_flag():
    import argparse

    parser = argparse.ArgumentParser()
    finetune_module.add_arguments(parser)
    args = parser.parse_args(["--linprobe", "--data", "fashion-mnist", "--epochs", "3"])
    config = finetune_module.config_from_args(args)
    assert config.linprobe and config.epochs == 3 and config.blr == 0.1
