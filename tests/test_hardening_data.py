"""Bad input in image folders and evaluation splits: each case is a file made here on the fly.

Labels come from the training split's classes; unreadable eval images are left out and counted, not replaced;
only regular files are opened (a FIFO would block for ever: that case runs in a subprocess with a timeout);
symlink loops are walked once; 16-bit and float images are scaled to 8 bits; decompression bombs are refused
per file; each bad file is one record (path, reason), counted once.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from train_helpers import tiny_config

from mae_fast.cli import main
from mae_fast.train import data, pretrain
from mae_fast.train.eval import evaluate, extract_features
from mae_fast.train.runmodel import build_model


def _save_random_png(path, seed, size=16):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def _split_folders(root, train_classes, val_classes, per_class=2):
    """root/train/<class>/<i>.png random images; root/val/<class>/ holds copies of train's same-named files
    (a class train lacks gets new images)."""
    for c, name in enumerate(train_classes):
        for i in range(per_class):
            _save_random_png(os.path.join(root, "train", name, f"{i}.png"), seed=10 * c + i)
    for c, name in enumerate(val_classes):
        os.makedirs(os.path.join(root, "val", name))
        for i in range(per_class):
            source = os.path.join(root, "train", name, f"{i}.png")
            target = os.path.join(root, "val", name, f"{i}.png")
            if os.path.exists(source):
                shutil.copyfile(source, target)
            else:
                _save_random_png(target, seed=1000 + 10 * c + i)


def _model_and_config(tmp_path, root):
    config = tiny_config(tmp_path, data_path=str(root)).validate()
    return build_model(config, torch.device("cpu")), config


# --- evaluation: one class list, unreadable images left out ----------------------------------------------


def test_val_split_is_labelled_by_the_training_classes(tmp_path):
    root = tmp_path / "ds"
    _split_folders(str(root), ["a", "b", "c"], ["b", "c"])
    (root / "val" / "a").mkdir()  # a folder without images holds no test image of "a" either
    model, config = _model_and_config(tmp_path, root)
    notes = []
    # val images are copies of training images: the nearest neighbour is the same image, with its label
    assert evaluate(model, config, "knn", k=1, notes=notes) == 1.0
    assert notes == ["the test split has no images of training class(es) ['a']"]
    test = data.build_source(config, "test", classes=data.build_source(config, "train").classes)
    assert test.classes == ["a", "b", "c"] and sorted({label for _, label in test.samples}) == [1, 2]


def test_a_val_class_that_training_lacks_is_an_error_naming_it(tmp_path):
    root = tmp_path / "ds"
    _split_folders(str(root), ["a", "b"], ["b", "zebra"])
    model, config = _model_and_config(tmp_path, root)
    with pytest.raises(ValueError, match=r"class folder\(s\) \['zebra'\] that the training split lacks"):
        evaluate(model, config, "knn", k=1)


def test_unreadable_eval_images_are_left_out_and_counted(tmp_path):
    root = tmp_path / "ds"
    _split_folders(str(root), ["a", "b"], ["a", "b"])
    empty = root / "val" / "a" / "0.png"
    empty.write_bytes(b"")  # its neighbour val/a/1.png is readable: it must not be scored in its place
    model, config = _model_and_config(tmp_path, root)
    source = data.build_source(config, "test")
    unreadable = []
    feats, labels = extract_features(model, source, batch_size=3, unreadable=unreadable)
    assert feats.shape[0] == 3 and labels.tolist() == [0, 1, 1]
    assert [record.path for record in unreadable] == [str(empty)]
    assert "UnidentifiedImageError" in unreadable[0].reason
    notes = []
    assert evaluate(model, config, "knn", k=1, notes=notes) == 1.0
    assert len(notes) == 1 and notes[0].startswith(f"left out 1 unreadable test image(s): {empty}: ")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        extract_features(model, source, limit=0)
    for name in ("0.png", "1.png"):
        (root / "val" / "b" / name).write_bytes(b"")
    (root / "val" / "a" / "1.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable image among the first 4"):
        extract_features(model, source)


def test_eval_cli_prints_what_the_score_leaves_out(tmp_path, capsys):
    root = tmp_path / "ds"
    _split_folders(str(root), ["a", "b", "c"], ["b", "c"])
    (root / "val" / "c" / "1.png").write_bytes(b"")
    run = pretrain(tiny_config(tmp_path, data_path=str(root), batch_size=4, max_steps=1))
    assert main(["eval", "knn", run.export, "--k", "1", "--random-init"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "note: the test split has no images of training class(es) ['a']"
    assert lines[1].startswith(f"note: left out 1 unreadable test image(s): {root / 'val' / 'c' / '1.png'}: ")
    assert lines[2] == "knn top-1 (mean-pooled features, imagefolder), pretrained: 1.0000"
    assert lines[3] == "knn top-1 (mean-pooled features, imagefolder), random init: 1.0000" and len(lines) == 4
    with pytest.raises(SystemExit, match="mae-fast eval: test_limit must be >= 1 .*, got 0"):
        main(["eval", "knn", run.export, "--test-limit", "0"])
    (root / "val" / "zebra").mkdir()
    with pytest.raises(SystemExit, match=r"mae-fast eval: .*\['zebra'\] that the training split lacks"):
        main(["eval", "linprobe", run.export])


# --- listing: regular files only, each real file once ------------------------------------------------------

_LIST_A_FIFO = """
import json, sys, warnings
from mae_fast.train import data
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    source = data.ImageFolderSource(sys.argv[1])
loaded = [source.load(index) for index in range(len(source))]
try:
    data.decode_image_file(sys.argv[2])
    fifo_error = None
except data.UnreadableImage as error:
    fifo_error = error.record.reason
print(json.dumps({
    "samples": [path for path, _ in source.samples],
    "skipped": [[record.path, record.reason] for record in source.skipped],
    "warnings": [str(w.message) for w in caught],
    "shapes": [list(image.shape) for image, _, _ in loaded],
    "bad": sum(len(bad) for _, _, bad in loaded),
    "fifo_error": fifo_error,
}))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_named_like_an_image_is_skipped_not_opened(tmp_path):
    root = tmp_path / "images"
    _save_random_png(str(root / "cls" / "a.png"), seed=0)
    fifo = root / "cls" / "b.jpg"
    os.mkfifo(fifo)
    # a regression would block in open(): the subprocess and its timeout turn that into a failure
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LIST_A_FIFO, str(root), str(fifo)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("listing or reading a folder with a FIFO blocked")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["samples"] == [str(root / "cls" / "a.png")]
    assert result["skipped"] == [[str(fifo), "a FIFO, not an image file"]]
    assert len(result["warnings"]) == 1 and "left out 1 path(s) that are not image files" in result["warnings"][0]
    assert result["shapes"] == [[3, 16, 16]] and result["bad"] == 0
    assert result["fifo_error"] == "a FIFO, not an image file"


def test_symlink_loops_and_links_list_each_real_file_once(tmp_path):
    folder = tmp_path / "images" / "cls"
    _save_random_png(str(folder / "a.png"), seed=0)
    _save_random_png(str(folder / "b.png"), seed=1)
    os.symlink(folder, folder / "loop")  # cls/loop/loop/... would list a and b once per level
    os.symlink(folder / "a.png", folder / "c.png")  # the same file under a second name
    os.symlink(tmp_path / "nowhere.png", folder / "broken.png")
    with pytest.warns(RuntimeWarning, match="left out 1 path"):
        source = data.ImageFolderSource(str(tmp_path / "images"))
    assert [os.path.basename(path) for path, _ in source.samples] == ["a.png", "b.png"]
    assert [record.path for record in source.skipped] == [str(folder / "broken.png")]


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, monkeypatch):
    root = tmp_path / "images"
    _save_random_png(str(root / "cls" / "a.png"), seed=0)
    _save_random_png(str(root / "cls" / "locked" / "b.png"), seed=1)
    locked, scandir = str(root / "cls" / "locked"), os.scandir

    def refuse_locked(path="."):  # what a folder without read permission does (the suite may run as root)
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)
    with pytest.warns(RuntimeWarning, match="cannot list the folder: Permission denied"):
        source = data.ImageFolderSource(str(root))
    assert [path for path, _ in source.samples] == [str(root / "cls" / "a.png")]
    assert source.skipped == [data.BadImage(locked, "cannot list the folder: Permission denied")]


# --- decoding: what the pixels are ------------------------------------------------------------------------


def _decoded_levels(image: Image.Image, mode: str, folder, name: str) -> list[int]:
    """Saves ``image`` as folder/cls/name, checks Pillow reads it back in ``mode``, returns the first row of
    the red channel the folder source decodes (all three channels equal)."""
    path = folder / "cls" / name
    path.parent.mkdir(parents=True)
    image.save(path)
    with Image.open(path) as reread:
        assert reread.mode == mode
    decoded, _, bad = data.ImageFolderSource(str(folder)).load(0)
    assert decoded.dtype == torch.uint8 and decoded.shape[0] == 3 and bad == []
    assert torch.equal(decoded[0], decoded[1]) and torch.equal(decoded[0], decoded[2])
    return decoded[0, 0].tolist()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    assert _decoded_levels(Image.fromarray(levels), "I;16", tmp_path / "png", "grey16.png") == [0, 1, 128, 255]
    # mode "I": 16-bit values in 32-bit ints
    wide = Image.fromarray(levels.astype(np.int32))
    assert _decoded_levels(wide, "I", tmp_path / "tif", "grey32.tif") == [0, 1, 128, 255]


def test_float_tiff_is_scaled_from_the_unit_range(tmp_path):
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32))
    assert _decoded_levels(image, "F", tmp_path, "float.tif") == [0, 128, 255, 255, 0]


def test_decompression_bombs_are_refused_per_file_and_counted(tmp_path, monkeypatch):
    root = tmp_path / "images"
    _save_random_png(str(root / "cls" / "0.png"), seed=0, size=16)
    _save_random_png(str(root / "cls" / "1.png"), seed=1, size=40)  # 1,600 pixels
    _save_random_png(str(root / "cls" / "2.png"), seed=2, size=64)  # 4,096 pixels
    source = data.ImageFolderSource(str(root), max_pixels=2_000)
    assert source.load(1)[0].shape == (3, 40, 40) and source.load(1)[2] == []
    image, label, bad = source.load(2)
    assert image.shape == (3, 16, 16) and label == 0  # refused in favour of the next file, 0.png
    reason = "decompression bomb: 64x64 pixels, above the limit of 2000"
    assert bad == [data.BadImage(str(root / "cls" / "2.png"), reason)]
    # Pillow's own limit: its warning above MAX_IMAGE_PIXELS, its error above twice that
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    for name, kind in (("1.png", "DecompressionBombWarning"), ("2.png", "DecompressionBombError")):
        with pytest.raises(data.UnreadableImage, match=kind) as caught:
            data.decode_image_file(str(root / "cls" / name))
        assert caught.value.record.path == str(root / "cls" / name)
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        data.ImageFolderSource(str(root), max_pixels=0)


# --- reports: one record per bad file ---------------------------------------------------------------------


def test_each_bad_file_is_one_record_even_with_separators_in_its_name(tmp_path):
    folder = tmp_path / "images" / "cls"
    for i in (0, 3):
        _save_random_png(str(folder / f"{i}.png"), seed=i)
    (folder / "1.png").write_bytes(b"not an image")
    separators = folder / "2; two; parts.png"  # a neighbour of 1.png, with the old report separator in its name
    separators.write_bytes(b"")
    dataset = data.MAEDataset(data.ImageFolderSource(str(tmp_path / "images")), 16, 16, seed=0)
    seen, count, records = set(), 0, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two epochs: each bad file once per epoch, one warning per file in all
            for batch in DataLoader(dataset, batch_size=2, collate_fn=data.collate):
                count += data.report_bad(batch["bad"], seen)
                records += batch["bad"]
    assert count == 4 and seen == {str(folder / "1.png"), str(separators)}
    assert all(isinstance(record, data.BadImage) for record in records)
    assert [record.path for record in sorted(set(records))] == sorted(seen)  # hashable, sorted by path
    assert sorted(str(w.message).split(": ")[0] for w in caught) == sorted(
        f"skipped unreadable image {path}" for path in seen
    )
