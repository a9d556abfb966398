"""Fine-tuning: the classifier against timm, pos_embed resizing, loading, exact resume, fp16 skips, bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mae_fast.models import create_model
from mae_fast.models.classifier import VisionTransformerClassifier, load_pretrained, to_timm_vit
from mae_fast.models.pos_embed import resize_pos_embed, sincos_pos_embed
from mae_fast.reference import sincos_pos_embed_2d
from mae_fast.train.finetune import (
    FinetuneConfig,
    SeededTransformDataset,
    Trainer,
    evaluate_checkpoint,
    finetune,
    param_groups_layer_decay,
)

TINY = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4, num_classes=10)


def tiny_classifier(**kwargs):
    torch.manual_seed(0)
    model = VisionTransformerClassifier(**{**TINY, **kwargs})
    with torch.no_grad():  # a head that is not ~0, so the logits compare something
        model.head.weight.normal_()
        model.fc_norm.weight.uniform_(0.5, 1.5) if model.global_pool else model.norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("global_pool", [True, False])
def test_timm_export_gives_equal_logits(global_pool):
    model = tiny_classifier(global_pool=global_pool, img_size=(16, 12)).eval()
    vit = to_timm_vit(model).eval()
    x = torch.randn(3, 1, 16, 12)
    ours, theirs = model(x), vit(x)
    assert ours.abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(vit.state_dict())


def test_drop_path_trains_and_is_off_in_eval():
    model = tiny_classifier(drop_path_rate=0.5)
    assert model.blocks[0].drop_path1.__class__.__name__ == "Identity"  # rate rises from 0, as timm
    x = torch.randn(8, 1, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))


def test_sincos_regeneration_is_exact_and_non_square():
    dim = 16
    old = sincos_pos_embed(dim, (4, 4))
    new = resize_pos_embed(old, (4, 4), (3, 5), mode="sincos")
    expected = torch.cat([torch.zeros(1, dim), sincos_pos_embed_2d(dim, (3, 5))])[None]
    assert torch.equal(new, expected)
    # a model built at the new size holds exactly that table
    model = VisionTransformerClassifier(**{**TINY, "img_size": (12, 20), "embed_dim": dim, "num_heads": 2})
    assert torch.equal(model.pos_embed.detach(), expected)


def test_bicubic_interpolation_as_the_release():
    torch.manual_seed(0)
    dim, prefix = 8, 1
    table = torch.randn(1, prefix + 4 * 6, dim)
    out = resize_pos_embed(table, (4, 6), (7, 3))
    grid = table[:, prefix:].reshape(1, 4, 6, dim).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(7, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(out[:, :prefix], table[:, :prefix])
    torch.testing.assert_close(out[:, prefix:], expected.reshape(1, 21, dim))
    assert torch.equal(resize_pos_embed(table, (4, 6), (4, 6)), table)
    with pytest.raises(ValueError, match="old_grid"):
        resize_pos_embed(table, (5, 5), (4, 4))


def test_loads_an_mae_export_and_interpolates_pos_embed():
    mae = create_model("mae_vit_tiny_patch4_32", img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=4)
    release = {"model": {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))}}
    model = VisionTransformerClassifier(**{**TINY, "img_size": 24})
    report = load_pretrained(model, release)
    assert report.pos_embed_resized == ((4, 4), (6, 6))
    assert torch.equal(model.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    assert "fc_norm.weight" in report.initialised_keys and "norm.weight" in report.dropped_keys
    # the encoder of the same weights at 16 px: equal features before the head (the MAE's encode)
    same = VisionTransformerClassifier(**TINY, global_pool=False)
    load_pretrained(same, mae.state_dict())
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(same.forward_features(x), mae.encode(x), rtol=1e-5, atol=1e-5)


def test_another_architecture_is_refused_naming_the_argument():
    mae = create_model("mae_vit_tiny_patch4_32", img_size=16, in_chans=1, embed_dim=32, depth=3, num_heads=4)
    with pytest.raises(ValueError, match="pretrained: .*lacks|pretrained: .*another"):
        load_pretrained(VisionTransformerClassifier(**{**TINY, "depth": 4}), mae.state_dict())
    wide = create_model("mae_vit_tiny_patch4_32", img_size=16, in_chans=1, embed_dim=48, depth=2, num_heads=4)
    with pytest.raises(ValueError, match="pretrained: .*shape"):
        load_pretrained(VisionTransformerClassifier(**TINY), wide.state_dict())


def test_planted_overflow_is_skipped_and_counted_under_fp16():
    model = VisionTransformerClassifier(**{**TINY, "img_size": 8})
    config = FinetuneConfig(precision="fp16", data="fashion-mnist", mixup=0.0, cutmix=0.0)
    optimizer = torch.optim.AdamW(param_groups_layer_decay(model))
    trainer = Trainer(model, optimizer, config, torch.device("cpu"), init_scale=8.0)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    _, applied = trainer.step([(x, y)], 1e-3)
    assert applied and trainer.skipped_steps == 0
    planted = {"on": True}
    model.head.weight.register_hook(lambda g: torch.full_like(g, math.inf) if planted["on"] else g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, applied = trainer.step([(x, y)], 1e-3)
    assert not applied and trainer.skipped_steps == 1 and trainer.scaler.get_scale() == 4.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    planted["on"] = False
    _, applied = trainer.step([(x, y)], 1e-3)
    assert applied and trainer.skipped_steps == 1


def small_run(tmp_path, name, **overrides):
    values = dict(
        model="vit_tiny_patch4_32", model_kwargs=dict(embed_dim=32, depth=2, num_heads=4), data="fashion-mnist",
        img_size=16, train_limit=64, epochs=2, warmup_epochs=0.5, batch_size=16, blr=1e-3, drop_path=0.2,
        mixup=0.8, cutmix=1.0, reprob=0.25, num_workers=0, eval_batch_size=500, log_every=1, ckpt_every=3,
        output_dir=str(tmp_path / name), progress=False,
    )  # fmt: skip
    return FinetuneConfig(**{**values, **overrides})


def test_resume_mid_epoch_is_bit_exact(tmp_path, monkeypatch):
    from mae_fast.train import data

    class SmallTest(data.FashionMNISTSubset):  # evaluate on 200 test images to keep the test short
        def __len__(self):
            return 200 if self.labels.numel() == 2000 else super().__len__()

    monkeypatch.setattr(data, "FashionMNISTSubset", SmallTest)
    full = finetune(small_run(tmp_path, "full"))
    assert full.step == 8 and full.export and os.path.isfile(full.export)
    part = finetune(small_run(tmp_path, "part", max_steps=5))
    assert part.step == 5 and part.export is None  # stopped mid-epoch 2 (4 steps per epoch)
    resumed = finetune(small_run(tmp_path, "part", resume="auto"))
    assert resumed.step == 8
    a = torch.load(full.export, weights_only=True)["model"]
    b = torch.load(resumed.export, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.history == resumed.history
    with open(tmp_path / "part" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if '"step"' in line]
    assert steps == list(range(1, 9))  # steps 6-8 continued from the checkpoint of step 5, none redone
    assert os.path.isfile(tmp_path / "full" / "metrics.jsonl")
    scores = evaluate_checkpoint(full.export, small_run(tmp_path, "eval"))
    assert scores["acc1"] == pytest.approx(full.final["acc1"])
    with pytest.raises(ValueError, match="resume: .*blr"):
        finetune(small_run(tmp_path, "part", resume="auto", blr=5e-3))


def test_scaler_state_is_in_the_checkpoint(tmp_path, monkeypatch):
    config = small_run(tmp_path, "fp16", precision="fp16", max_steps=1, mixup=0.0, cutmix=0.0)
    result = finetune(config)
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["scaler"]["scale"] > 0 and "skipped_steps" in state["metrics"]


@pytest.mark.parametrize(
    ("overrides", "word"),
    [
        (dict(model="vit_giant"), "model"),
        (dict(preset="vit_x"), "preset"),
        (dict(mixup=-0.1), "mixup"),
        (dict(mixup_prob=1.5), "mixup_prob"),
        (dict(mixup_mode="cube"), "mixup_mode"),
        (dict(smoothing=2.0), "smoothing"),
        (dict(drop_path=1.0), "drop_path"),
        (dict(layer_decay=0.0), "layer_decay"),
        (dict(batch_size=15, accum_steps=1), "even"),
    ],
)
def test_bad_settings_name_the_argument(tmp_path, overrides, word):
    with pytest.raises(ValueError, match=word):
        FinetuneConfig.from_dict({**small_run(tmp_path, "bad").to_dict(), **overrides}).validate()


def test_folder_without_val_is_refused(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="data_path: .*val/"):
        FinetuneConfig(data="imagefolder", data_path=str(tmp_path)).validate()


def test_label_out_of_range_names_labels():
    class Source:
        classes, in_chans, mean, std = ["a", "b"], 1, (0.0,), (1.0,)

        def __len__(self):
            return 1

        def load(self, index):
            return torch.zeros(1, 4, 4, dtype=torch.uint8), 5, []

    with pytest.raises(ValueError, match="labels: .*label 5"):
        SeededTransformDataset(Source(), lambda img: img.float(), 0, 2)[(0, 0)]


def test_presets_hold_the_release_numbers():
    b = FinetuneConfig.from_dict({"preset": "vit_b", "data": "fashion-mnist"})
    assert (b.blr, b.layer_decay, b.drop_path, b.epochs, b.model) == (5e-4, 0.65, 0.1, 100, "vit_base_patch16")
    h = FinetuneConfig.from_dict({"preset": "vit_h", "data": "fashion-mnist"})
    assert (h.blr, h.layer_decay, h.drop_path, h.epochs) == (1e-3, 0.75, 0.3, 50)
    assert (b.batch_size, b.mixup, b.cutmix, b.reprob, b.smoothing) == (1024, 0.8, 1.0, 0.25, 0.1)
    assert FinetuneConfig.from_dict({"preset": "vit_l", "epochs": 3, "data": "fashion-mnist"}).epochs == 3


def test_official_encoder_only_file_fine_tunes_on_an_rgb_folder(tmp_path):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (40, 44, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / label / f"{i}.png")
    mae = create_model("mae_vit_tiny_patch4_32", embed_dim=32, depth=2, num_heads=4)
    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))}
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_vit_tiny.pth")  # the release's encoder-only layout
    config = FinetuneConfig(
        pretrained=str(tmp_path / "mae_pretrain_vit_tiny.pth"), model="vit_tiny_patch4_32",
        model_kwargs=dict(embed_dim=32, depth=2, num_heads=4), data="imagefolder", data_path=str(tmp_path / "data"),
        epochs=1, batch_size=4, warmup_epochs=0.0, num_workers=0, output_dir=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    result = finetune(config.validate())
    assert result.step == 2 and result.final["count"] == 8
    assert "fc_norm.weight" in result.load_report and os.path.isfile(tmp_path / "run" / "confusion_matrix.png")


def test_official_sizes_are_recognised_from_the_weights():
    from mae_fast.train.finetune import classifier_kwargs

    for name, heads in (("mae_vit_base_patch16", 12), ("mae_vit_large_patch16", 16), ("mae_vit_huge_patch14", 16)):
        with torch.device("meta"):
            state = create_model(name).state_dict()
        kwargs = classifier_kwargs(FinetuneConfig(data="imagefolder"), 1000, 3, state, {})
        assert kwargs["num_heads"] == heads and kwargs["embed_dim"] == state["cls_token"].shape[-1]
        assert kwargs["img_size"] == 224  # the pretrained grid unless --img-size (then pos_embed is interpolated)
        kwargs = classifier_kwargs(FinetuneConfig(data="imagefolder", img_size=448), 1000, 3, state, {})
        assert kwargs["img_size"] == 448


def test_demo_pretrains_when_missing_and_prints_one_line(tmp_path, monkeypatch, capsys):
    import argparse
    import re

    from mae_fast.train import cli as pretrain_cli
    from mae_fast.train import finetune as finetune_module

    monkeypatch.setattr(pretrain_cli, "DEMO", {**pretrain_cli.DEMO, "max_steps": 2, "visualize": False})
    monkeypatch.setattr(finetune_module, "DEMO", {**finetune_module.DEMO, "train_limit": 64, "epochs": 1,
                                                  "batch_size": 32, "num_workers": 0})  # fmt: skip
    assert finetune_module.run(argparse.Namespace(demo=True, output_dir=str(tmp_path))) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fine-tune top-1:")]
    assert len(lines) == 1
    assert re.match(r"fine-tune top-1: pretrained 0\.\d{4} vs scratch 0\.\d{4} \(margin [+-]\d+\.\d points\)", lines[0])
    assert os.path.isfile(tmp_path / "mae_pretrain.pth")
    assert os.path.isfile(tmp_path / "finetune" / "scratch" / "finetuned.pth")


def test_a_transformers_vitmae_folder_loads(tmp_path):
    pytest.importorskip("transformers")
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from mae_fast.models.classifier import encoder_state_dict

    config = ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=16,
        patch_size=4, num_channels=1, decoder_hidden_size=16, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64, layer_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = ViTMAEForPreTraining(config)
    hf.save_pretrained(tmp_path / "hf")
    model = VisionTransformerClassifier(**TINY)
    load_pretrained(model, str(tmp_path / "hf"))
    layer = hf.vit.layers[0] if hasattr(hf.vit, "layers") else hf.vit.encoder.layer[0]
    assert torch.equal(model.blocks[0].norm1.weight, layer.layernorm_before.weight)
    assert torch.equal(model.patch_embed.proj.weight, hf.vit.embeddings.patch_embeddings.projection.weight)
    with pytest.raises(ValueError, match="pretrained: .*config"):
        encoder_state_dict(hf.state_dict())


def test_cli_registers_finetune_and_errors_name_the_argument():
    from mae_fast import cli

    assert cli.SUBCOMMANDS["finetune"][0] == "mae_fast.train.finetune"
    with pytest.raises(SystemExit, match="mae-fast finetune: model: unknown model 'vit_x'"):
        cli.main(["finetune", "--model", "vit_x", "--data", "fashion-mnist"])
    with pytest.raises(SystemExit, match="preset"):
        cli.main(["finetune", "--preset", "vit_q", "--data", "fashion-mnist"])
    with pytest.raises(SystemExit, match="--eval needs"):
        cli.main(["finetune", "--eval", "--data", "fashion-mnist"])
