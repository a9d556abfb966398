"""Reconstruction pictures: norm-pix un-normalisation, pasted visible patches, PNG files, the CLI."""

import argparse
import os

import numpy as np
import pytest
import torch
from tiny_models import tiny_mae
from train_helpers import quick_run_config, tiny_config

from mae_fast.cli import main
from mae_fast.models import create_model
from mae_fast.train import pretrain
from mae_fast.train.runmodel import model_from_checkpoint
from mae_fast.train.visualize import load_image, reconstruct, save_loss_curve, save_reconstruction_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


@pytest.mark.parametrize("norm_pix", [True, False])
def test_a_perfect_prediction_reconstructs_the_image(norm_pix, monkeypatch):
    """If the model predicted exactly its (normalised) target, every column would show the original."""
    model = tiny_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)

    def perfect(self, imgs, mask_ratio, noise):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        _, mask, _ = self.forward_encoder(imgs, mask_ratio, noise)
        return torch.zeros(()), target, mask

    monkeypatch.setattr(type(model), "forward", perfect)
    out = reconstruct(model, imgs, noise, 0.75)
    torch.testing.assert_close(out["reconstruction"], imgs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pasted"], imgs)
    assert out["mask"].sum(dim=1).tolist() == [12.0] * 3
    patches = model.patchify(out["masked"])
    assert torch.isnan(patches[:, :, 0][out["mask"].bool()]).all()
    assert not torch.isnan(patches[:, :, 0][~out["mask"].bool()]).any()


def test_pasted_keeps_the_visible_patches_of_a_real_model():
    model = tiny_mae(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 16, 16)
    out = reconstruct(model, imgs, torch.rand(2, 16), 0.75)
    visible = ~out["mask"].bool()
    torch.testing.assert_close(model.patchify(out["pasted"])[visible], model.patchify(imgs)[visible])
    removed = out["mask"].bool()
    torch.testing.assert_close(model.patchify(out["pasted"])[removed], model.patchify(out["reconstruction"])[removed])


def test_grid_and_loss_curve_are_pngs(tmp_path):
    model = tiny_mae(in_chans=1)
    grid = save_reconstruction_grid(
        model, torch.randn(2, 1, 16, 16), torch.rand(2, 16), (0.5,), (0.25,), 0.75, str(tmp_path / "g" / "grid.png")
    )
    curve = save_loss_curve([(1, 1.0), (2, 0.5), (3, 0.05)], str(tmp_path / "curve.png"))
    assert _is_png(grid) and _is_png(curve)


def test_visualize_cli_on_image_files(tmp_path, capsys):
    from PIL import Image

    result = pretrain(quick_run_config(tmp_path / "run", max_steps=1))
    paths = []
    for i, size in enumerate([(40, 30), (28, 28)]):
        path = str(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    out = str(tmp_path / "recon.png")
    assert main(["visualize", result.export, *paths, "--out", out]) == 0
    assert _is_png(out) and "2 images" in capsys.readouterr().out
    img = load_image(paths[0], 1, 28, (0.0,), (1.0,))
    assert img.shape == (1, 28, 28) and 0.0 <= img.min() and img.max() <= 1.0
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(str(tmp_path / "none.png"), 1, 28, (0.0,), (1.0,))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(str(bad), 1, 28, (0.0,), (1.0,))


def test_release_checkpoint_runs_in_visualize(tmp_path, capsys):
    """visualize / eval build the model the release's 'args' name, at its image size and mask ratio."""
    from PIL import Image

    source = create_model("mae_vit_tiny_patch4_32")
    args = argparse.Namespace(model="mae_vit_tiny_patch4_32", input_size=32, mask_ratio=0.6, norm_pix_loss=False)
    path = str(tmp_path / "checkpoint-10.pth")
    torch.save({"model": source.state_dict(), "epoch": 10, "args": args}, path)
    model, config = model_from_checkpoint(path)
    assert (config.mask_ratio, config.norm_pix_loss, model.img_size, model.in_chans) == (0.6, False, (32, 32), 3)
    torch.testing.assert_close(model.state_dict(), source.state_dict(), rtol=0, atol=0)
    image = str(tmp_path / "cat.png")
    Image.new("RGB", (40, 36), (10, 200, 30)).save(image)
    assert main(["visualize", path, image, "--out", str(tmp_path / "grid.png")]) == 0
    assert "mask ratio 0.6" in capsys.readouterr().out and os.path.getsize(tmp_path / "grid.png") > 1000
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(model="mae_vit_giant")}, path)
    with pytest.raises(ValueError, match="the release's 'args' lack input_size, mask_ratio, norm_pix_loss"):
        model_from_checkpoint(path)


@pytest.fixture(scope="module")
def export_and_image(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("visualize")
    config = tiny_config(root, epochs=1)
    result = pretrain(config)
    image = str(root / "shirt.png")
    Image.new("RGB", (20, 20), (120, 30, 200)).save(image)
    return result.export, image


def test_visualize_reports_the_file_it_wrote(tmp_path, export_and_image, capsys):
    export, image = export_and_image
    assert main(["visualize", export, image, "--out", str(tmp_path / "x")]) == 0
    assert os.listdir(tmp_path) == ["x.png"]
    assert f"wrote {tmp_path / 'x.png'}:" in capsys.readouterr().out


def test_visualize_refuses_an_empty_out(export_and_image):
    with pytest.raises(SystemExit, match="--out must not be empty"):
        main(["visualize", *export_and_image, "--out", ""])


def test_visualize_names_an_unreadable_checkpoint_in_one_line(tmp_path, export_and_image):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"")
    with pytest.raises(SystemExit, match=f"^mae-fast visualize: {broken} is not a readable .*: the file is empty$"):
        main(["visualize", str(broken), export_and_image[1], "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_visualize_out_directory_writes_inside_it(tmp_path, export_and_image, capsys):
    export, image = export_and_image
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert main(["visualize", export, image, "--out", str(folder)]) == 0
    assert os.listdir(folder) == ["reconstruction.png"] and sorted(os.listdir(tmp_path)) == ["pictures"]
    assert f"wrote {folder / 'reconstruction.png'}:" in capsys.readouterr().out


@pytest.mark.parametrize("ratio, message", [("0", r"in \(0, 1\)"), ("1", r"in \(0, 1\)"), ("0.99", "keeps no")])
def test_visualize_refuses_a_mask_ratio_that_removes_or_keeps_everything(tmp_path, export_and_image, ratio, message):
    with pytest.raises(SystemExit, match=message):
        main(["visualize", *export_and_image, "--mask-ratio", ratio, "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_visualize_reads_a_16_bit_image_as_training_does(tmp_path, export_and_image, capsys):
    """A 16-bit PNG's mid-grey is mid-grey (scaled, not clipped to white); a FIFO is refused in one line."""
    from PIL import Image

    from mae_fast.train.visualize import load_image

    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(grey)
    pixels = load_image(str(grey), 3, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.allclose(pixels, torch.full_like(pixels, 128 / 255))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(SystemExit, match="^mae-fast visualize: cannot read image .*pipe.png: a FIFO"):
        main(["visualize", export_and_image[0], str(fifo), "--out", str(tmp_path / "x.png")])
