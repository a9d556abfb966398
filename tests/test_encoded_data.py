"""The bytes pipeline: workers' draws equal the pixel pipeline's, batch decode, bad files, the CUDA prefetcher."""

import io
import itertools
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import quick_run_config, tiny_config

from mae_fast.train import data, encoded_data, pretrain

NUM_PATCHES = 16


def _photo(height, width, seed):
    """A smooth random RGB picture (JPEG-friendly), uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def _jpeg_folder(root, sizes, per_class=2):
    paths = []
    for c in range(2):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            height, width = sizes[(c * per_class + i) % len(sizes)]
            path = os.path.join(root, f"class{c}", f"{i:03d}.jpg")
            Image.fromarray(_photo(height, width, 10 * c + i)).save(path, quality=90)
            paths.append(path)
    return paths


def _config(tmp_path, root, **overrides):
    values = dict(data="imagefolder", data_path=str(root), img_size=16, batch_size=4, seed=5)
    return quick_run_config(tmp_path / "run", **{**values, **overrides})


def test_worker_draws_equal_the_pixel_pipeline(tmp_path, monkeypatch):
    root = str(tmp_path / "images")
    _jpeg_folder(root, [(40, 60), (64, 30), (17, 17), (90, 33)], per_class=3)
    source = data.ImageFolderSource(root)
    pixel = data.MAEDataset(source, 16, NUM_PATCHES, seed=7, train=True)
    encoded = encoded_data.EncodedImageDataset(source, NUM_PATCHES, seed=7)
    drawn = []
    original = data.random_resized_crop_box
    monkeypatch.setattr(data, "random_resized_crop_box", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    flips = 0
    for epoch in (0, 3):
        for index in range(len(source)):
            expected = pixel[(epoch, index)]
            item = encoded[(epoch, index)]
            assert item["box"] == drawn[-1]
            assert torch.equal(item["noise"], expected["noise"])
            # the pixel pipeline's own image, rebuilt from the worker's box and flip, is the same image
            top, left, h, w = item["box"]
            raw, _ = source.read(index)
            img = data._resize(raw[:, top : top + h, left : left + w].float().div_(255.0), 16)
            img = img.flip(-1) if item["flip"] else img
            assert torch.equal((img - pixel.mean) / pixel.std, expected["imgs"])
            assert item["key"] == (epoch, index, index) and item["batch_decodable"] and item["bad"] == []
            assert item["size"] == tuple(raw.shape[1:])
            assert torch.equal(item["data"], torch.frombuffer(bytearray(open(source.samples[index][0], "rb").read()),
                                                              dtype=torch.uint8))
            flips += item["flip"]
    assert 0 < flips < 2 * len(source)  # both flip outcomes were exercised


def test_decoded_batches_match_the_pixel_pipeline_and_are_a_function_of_position(tmp_path):
    root = tmp_path / "images"
    _jpeg_folder(str(root), [(48, 64), (64, 40), (33, 50)], per_class=4)
    config = _config(tmp_path, root)
    stream = encoded_data.build_encoded_train_data(config, 16, NUM_PATCHES, 1, 0, "cpu")
    pixels = data.build_train_data(config, 16, NUM_PATCHES, 1, 0, "cpu")
    assert stream.steps_per_epoch == pixels.steps_per_epoch == 2 and stream.in_chans == 3
    got = list(stream.start(1, 0, 4))
    want = list(pixels.start(1, 0, 4))
    assert len(got) == len(want) == 2
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    for a, b in zip(got, want, strict=True):
        assert a["imgs"].shape == b["imgs"].shape == (4, 3, 16, 16) and a["imgs"].dtype == torch.float32
        assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["label"], b["label"]) and a["bad"] == []
        # libjpeg vs Pillow decode and uint8 vs float resampling: a few levels apart at most
        assert ((a["imgs"] - b["imgs"]) * std).abs().max() < 6 / 255
    resumed = list(stream.start(1, 1, 4))
    assert len(resumed) == 1 and torch.equal(resumed[0]["imgs"], got[1]["imgs"])
    config_workers = _config(tmp_path, root, num_workers=2)
    stream_workers = encoded_data.build_encoded_train_data(config_workers, 16, NUM_PATCHES, 1, 0, "cpu")
    for a, b in zip(got, list(stream_workers.start(1, 0, 4)), strict=True):
        assert torch.equal(a["imgs"], b["imgs"]) and torch.equal(a["noise"], b["noise"])
    rank1 = encoded_data.build_encoded_train_data(_config(tmp_path, root, batch_size=8), 16, NUM_PATCHES, 2, 1,
                                                  "cpu")
    assert all(b["imgs"].shape[0] == 4 for b in rank1.start(1, 0, 4))


def _save(image, path, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, **kwargs)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return buffer.getvalue()


def _bad_input_folder(root):
    """Readable odd files and unreadable ones; returns (readable paths, unreadable paths)."""
    good_dir, odd_dir = os.path.join(root, "a"), os.path.join(root, "b")
    os.makedirs(good_dir)
    os.makedirs(odd_dir)
    readable = []
    for i, (h, w) in enumerate([(40, 56), (30, 30), (50, 20), (64, 48), (45, 45)]):
        readable.append(os.path.join(good_dir, f"{i}.jpg"))
        _save(Image.fromarray(_photo(h, w, i)), readable[-1], format="JPEG", quality=90)
    odd = {
        "one_pixel.jpg": (Image.new("RGB", (1, 1), (200, 10, 10)), dict(format="JPEG")),
        "one_pixel.png": (Image.new("L", (1, 1), 77), dict(format="PNG")),
        "huge.jpg": (Image.new("RGB", (8000, 1500), (30, 90, 150)), dict(format="JPEG", quality=50)),
        "cmyk.jpg": (Image.fromarray(_photo(32, 40, 7)).convert("CMYK"), dict(format="JPEG")),
        "grey.jpg": (Image.fromarray(_photo(32, 40, 8)).convert("L"), dict(format="JPEG")),
        "progressive.jpg": (Image.fromarray(_photo(33, 41, 12)), dict(format="JPEG", progressive=True)),
        "exif.jpg": (Image.fromarray(_photo(34, 42, 13)), dict(format="JPEG", exif=b"Exif\x00\x00" + b"\x00" * 64)),
        "palette.png": (Image.fromarray(_photo(20, 24, 9)).convert("P"), dict(format="PNG")),
        "alpha.png": (Image.fromarray(_photo(20, 24, 10)).convert("RGBA"), dict(format="PNG")),
        "deep.png": (Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50), dict(format="PNG")),
    }
    for name, (image, kwargs) in odd.items():
        readable.append(os.path.join(odd_dir, name))
        _save(image, readable[-1], **kwargs)
    jpeg = _save(Image.fromarray(_photo(40, 40, 11)), os.path.join(odd_dir, "truncated.jpg"), format="JPEG")
    with open(os.path.join(odd_dir, "truncated.jpg"), "wb") as f:
        f.write(jpeg[: len(jpeg) // 3])
    open(os.path.join(odd_dir, "zero.jpg"), "wb").close()
    with open(os.path.join(odd_dir, "notes.jpg"), "w") as f:
        f.write("this is a text file, not a picture\n")
    unreadable = [os.path.join(odd_dir, name) for name in ("truncated.jpg", "zero.jpg", "notes.jpg")]
    return readable, unreadable


def test_bad_files_are_reported_replaced_and_counted(tmp_path):
    root = str(tmp_path / "images")
    readable, unreadable = _bad_input_folder(root)
    files = len(readable) + len(unreadable)  # 18
    config = _config(tmp_path, root, batch_size=files // 2)
    stream = encoded_data.build_encoded_train_data(config, 16, NUM_PATCHES, 1, 0, "cpu")
    pixels = data.build_train_data(config, 16, NUM_PATCHES, 1, 0, "cpu")
    seen, count, pixel_seen, pixel_count = set(), 0, set(), 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in (0, 1):
            for batch in stream.start(epoch, 0, files // 2):
                assert batch["imgs"].shape == (files // 2, 3, 16, 16) and torch.isfinite(batch["imgs"]).all()
                count += data.report_bad(batch["bad"], seen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in (0, 1):
            for batch in pixels.start(epoch, 0, files // 2):
                pixel_count += data.report_bad(batch["bad"], pixel_seen)
    assert count == pixel_count == 2 * len(unreadable)  # every unreadable file, every epoch, as today
    assert seen == pixel_seen == set(unreadable)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for path in unreadable:
        assert sum(path in m for m in messages) == 1  # reported once, with its path
    assert not any(path in m for m in messages for path in readable)


def test_pretraining_through_the_bytes_pipeline_resumes_bit_exactly_and_counts_bad_files(tmp_path, monkeypatch):
    """The loop with the bytes pipeline in place of the pixel one: stopped at step 4 of 9 (mid-epoch) and
    resumed with workers, its losses and weights equal the uninterrupted run's; both planted files counted."""
    root = tmp_path / "images"
    _jpeg_folder(str(root), [(20, 24), (18, 30), (32, 16)], per_class=11)
    jpeg = (root / "class0" / "000.jpg").read_bytes()
    (root / "class0" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "class1" / "notes.jpg").write_text("not a picture")
    streams = []
    build = encoded_data.build_encoded_train_data
    monkeypatch.setattr(encoded_data, "build_encoded_train_data", lambda *a: streams.append(build(*a)) or streams[-1])
    common = dict(data_path=str(root), accum_steps=2, decode_on="device")  # on the CPU only when asked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = pretrain(tiny_config(tmp_path, "full", **common))
        first = pretrain(tiny_config(tmp_path, "split", max_steps=4, **common))
        second = pretrain(tiny_config(tmp_path, "split", resume="auto", num_workers=2, **common))
        pixels = pretrain(tiny_config(tmp_path, "pixels", data_path=str(root), accum_steps=2, max_steps=1))
    assert full.step == 9 and first.step == 4 and second.step == 9
    assert len(streams) == 3 and all(isinstance(t.loader, encoded_data.DecodedBatches) for t in streams)
    assert pixels.step == 1 and len(streams) == 3  # decode_on=None on the CPU: the Pillow pipeline
    assert full.bad_images == 2 * 3  # both files, each of the 3 epochs
    assert second.history == full.history
    a, b = (torch.load(r.export, weights_only=True)["model"] for r in (full, second))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_every_kind_of_readable_file_decodes_to_rgb(tmp_path):
    readable, _ = _bad_input_folder(str(tmp_path / "images"))
    for path in readable:
        data_bytes, height, width, batch_decodable = encoded_data.read_encoded(path, data.MAX_IMAGE_PIXELS)
        image = encoded_data.decode_on_cpu(data_bytes, path, data.MAX_IMAGE_PIXELS)
        assert torch.equal(image, data.decode_image_file(path)), path  # the pixel pipeline's pixels
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, height, width), path
        with Image.open(path) as opened:  # the header walk agrees with Pillow's header
            assert (height, width) == (opened.height, opened.width), path
            assert batch_decodable == (opened.format == "JPEG" and opened.mode in ("L", "RGB")), path
        is_jpeg = path.endswith(".jpg")
        assert (encoded_data.jpeg_header(data_bytes.numpy().tobytes()) is not None) == is_jpeg, path
    bomb = os.path.join(os.path.dirname(readable[-1]), "huge.jpg")
    with pytest.raises(data.UnreadableImage, match="decompression bomb: 8000x1500 pixels"):
        encoded_data.read_encoded(bomb, max_pixels=8000 * 1500 - 1)
    deep = data.decode_image_file(readable[-1])
    assert len(deep.unique()) > 2  # 16-bit values scaled to 8 bits, not clipped to one level


def test_a_header_that_lies_about_the_size_gets_the_draws_of_the_decoded_size(tmp_path):
    root = str(tmp_path / "images")
    _jpeg_folder(root, [(40, 60)], per_class=1)
    source = data.ImageFolderSource(root)
    dataset = encoded_data.EncodedImageDataset(source, NUM_PATCHES, seed=1)
    items = [dataset[(2, 0)], dataset[(2, 1)]]
    items[1]["size"], items[1]["box"] = (400, 600), (300, 500, 100, 100)  # outside the real 40 x 60 image
    batch = encoded_data.collate_encoded(items)
    out = encoded_data.BatchDecoder(source, 16, NUM_PATCHES, 1, "cpu")(batch)
    box, flip, noise = encoded_data.draw_sample(1, 2, 1, 40, 60, NUM_PATCHES)
    assert batch["boxes"][1].tolist() == list(box) and bool(batch["flip"][1]) == flip
    assert torch.equal(out["noise"][1], noise) and out["imgs"].shape == (2, 3, 16, 16)
    assert torch.equal(out["noise"][0], items[0]["noise"])


def test_a_folder_with_no_readable_file_is_a_clear_error(tmp_path):
    for name, content in (("headers", b"not an image"), ("bodies", None)):
        root = tmp_path / name
        (root / "a").mkdir(parents=True)
        for i in range(4):
            if content is None:
                buffer = io.BytesIO()
                Image.fromarray(_photo(30, 30, i)).save(buffer, format="JPEG")
                (root / "a" / f"{i}.jpg").write_bytes(buffer.getvalue()[:200])
            else:
                (root / "a" / f"{i}.jpg").write_bytes(content)
        config = _config(tmp_path, root, batch_size=2)
        stream = encoded_data.build_encoded_train_data(config, 16, NUM_PATCHES, 1, 0, "cpu")
        with pytest.raises(RuntimeError, match=f"no readable image under {root}"):
            next(iter(stream.start(0, 0, 2)))


def test_fashion_mnist_pixels_augmented_by_the_op_equal_the_worker_pipeline(tmp_path):
    """The embedded data as uint8 pixels + draws, augmented by resized_crop: the pixel pipeline's batches up to
    float rounding (the same RandomResizedCrop and flip), a function of position, the same with workers."""
    config = quick_run_config(tmp_path / "run", batch_size=8, seed=3)
    stream = encoded_data.build_encoded_train_data(config, 28, 49, 1, 0, "cpu")
    pixels = data.build_train_data(config, 28, 49, 1, 0, "cpu")
    assert isinstance(stream.loader, encoded_data.DecodedBatches) and stream.in_chans == 1
    assert stream.steps_per_epoch == pixels.steps_per_epoch == 10_000 // 8
    got = list(itertools.islice(stream.start(2, 40, 8), 3))
    want = list(itertools.islice(pixels.start(2, 40, 8), 3))
    for a, b in zip(got, want, strict=True):
        assert a["imgs"].shape == (8, 1, 28, 28) and a["imgs"].dtype == torch.float32 and a["bad"] == []
        assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["label"], b["label"])
        assert not torch.equal(a["imgs"], a["imgs"].flip(-1))  # not trivially symmetric pictures
        assert (a["imgs"] - b["imgs"]).abs().max() < 1e-5  # normalised units; a wrong box or flip is ~1
    assert torch.equal(next(iter(stream.start(2, 41, 8)))["imgs"], got[1]["imgs"])  # resumed: same batch
    with_workers = encoded_data.build_encoded_train_data(
        quick_run_config(tmp_path / "run", batch_size=8, seed=3, num_workers=2), 28, 49, 1, 0, "cpu"
    )
    for a, b in zip(got, itertools.islice(with_workers.start(2, 40, 8), 3), strict=True):
        assert torch.equal(a["imgs"], b["imgs"]) and torch.equal(a["noise"], b["noise"])


def test_pixel_batches_of_mixed_sizes_keep_each_image_and_its_draws(tmp_path):
    root = str(tmp_path / "images")
    _jpeg_folder(root, [(20, 31), (9, 14), (40, 12)], per_class=2)
    source = data.ImageFolderSource(root)
    dataset = encoded_data.PixelDataset(source, NUM_PATCHES, seed=4)
    pixel = data.MAEDataset(source, 12, NUM_PATCHES, seed=4, train=True)
    keys = [(1, i) for i in range(len(source))]
    batch = encoded_data.collate_pixels([dataset[key] for key in keys])
    assert batch["shapes"].tolist() == [[3, *source.read(i)[0].shape[1:]] for i in range(len(source))]
    out = encoded_data.PixelBatchAugmenter(source, 12, "cpu")(batch)
    want = data.collate([pixel[key] for key in keys])
    assert torch.equal(out["noise"], want["noise"]) and torch.equal(out["label"], want["label"])
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    assert ((out["imgs"] - want["imgs"]) * std).abs().max() < 1e-5


def test_fashion_mnist_pretraining_augments_on_the_device_and_resumes_bit_exactly(tmp_path, monkeypatch):
    """The demo's data path: stopped at step 2 and resumed with workers, the losses and weights of the
    uninterrupted run; decode_on="cpu" keeps the worker-side pixel pipeline."""
    streams, pixel_streams = [], []
    build, build_pixels = encoded_data.build_encoded_train_data, data.build_train_data
    monkeypatch.setattr(encoded_data, "build_encoded_train_data", lambda *a: streams.append(build(*a)) or streams[-1])
    monkeypatch.setattr(
        data, "build_train_data", lambda *a: pixel_streams.append(build_pixels(*a)) or pixel_streams[-1]
    )
    common = dict(log_every=1, accum_steps=2)
    full = pretrain(quick_run_config(tmp_path / "full", max_steps=4, **common))
    pretrain(quick_run_config(tmp_path / "split", max_steps=2, **common))
    second = pretrain(quick_run_config(tmp_path / "split", max_steps=4, resume="auto", num_workers=2, **common))
    assert len(streams) == 3 and not pixel_streams
    assert full.step == second.step == 4 and second.history == full.history
    a, b = (torch.load(r.export, weights_only=True)["model"] for r in (full, second))
    assert all(torch.equal(a[key], b[key]) for key in a)
    pretrain(quick_run_config(tmp_path / "cpu", max_steps=1, decode_on="cpu"))
    assert len(streams) == 3 and len(pixel_streams) == 1


def test_only_image_folders_take_the_bytes_pipeline(tmp_path):
    with pytest.raises(ValueError, match="ImageFolder"):
        encoded_data.build_encoded_train_data(_config(tmp_path, tmp_path, data="synthetic"), 16, 16, 1, 0, "cpu")


@pytest.mark.gpu
def test_cuda_prefetcher_equals_the_cpu_decode(tmp_path):
    root = tmp_path / "images"
    readable, unreadable = _bad_input_folder(str(root))
    config = _config(tmp_path, root, batch_size=8)
    cpu = encoded_data.build_encoded_train_data(config, 16, NUM_PATCHES, 1, 0, "cpu")
    gpu = encoded_data.build_encoded_train_data(config, 16, NUM_PATCHES, 1, 0, "cuda")
    for a, b in zip(cpu.start(0, 0, 8), gpu.start(0, 0, 8), strict=True):
        assert b["imgs"].is_cuda and b["noise"].is_cuda
        assert torch.equal(a["noise"], b["noise"].cpu()) and torch.equal(a["label"], b["label"])
        assert sorted(a["bad"]) == sorted(b["bad"])
        std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
        assert ((a["imgs"] - b["imgs"].cpu()) * std).abs().max() < 6 / 255  # nvJPEG vs libjpeg IDCT


@pytest.mark.gpu
def test_cuda_fashion_mnist_pixels_equal_the_cpu_augmentation(tmp_path):
    config = quick_run_config(tmp_path / "run", batch_size=16, seed=2)
    cpu = encoded_data.build_encoded_train_data(config, 28, 49, 1, 0, "cpu")
    gpu = encoded_data.build_encoded_train_data(config, 28, 49, 1, 0, "cuda")
    for a, b in zip(itertools.islice(cpu.start(1, 3, 16), 3), itertools.islice(gpu.start(1, 3, 16), 3), strict=True):
        assert b["imgs"].is_cuda and b["noise"].is_cuda and torch.equal(a["noise"], b["noise"].cpu())
        assert torch.equal(a["label"], b["label"])
        levels = (a["imgs"] - b["imgs"].cpu()).abs().max() * data.FASHION_MNIST_STD[0] * 255
        assert levels < 1.0  # the Triton kernel within a level of the torch backend


def test_bench_data_writes_the_three_pipelines_side_by_side(tmp_path, monkeypatch):
    import json

    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import bench_data

    assert bench_data.main(["--rounds", "1", "--batch", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("data_cpu_*.json")
    result = json.loads(path.read_text())
    assert [row["pipeline"] for row in result["rows"]] == ["pillow_release", "bytes_host_share", "bytes_all_cpu"]
    assert all(row["cpu_ms_per_image"] > 0 and row["img_per_s_per_worker"] > 0 for row in result["rows"])
    assert result["environment"]["threads"] == 1 and result["environment"]["torchvision"]
    assert all(size[:2] in ([500, 375], [375, 500]) for size in result["images"].values())


def test_bench_data_device_section_runs_its_three_measurements(tmp_path, monkeypatch):
    """The GPU script's data stage, run here on the CPU with the tiny model: loader alone, stage times, step."""
    import json

    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import bench_data

    argv = ["--device", "cpu", "--model", "tiny", "--workers", "1", "--batch", "2", "--loader-batches", "3"]
    assert bench_data.main([*argv, "--steps", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("input_pipeline_cpu_*.json")
    result = json.loads(path.read_text())
    section = result["device_section"]
    assert section["batch"] == 2 and section["loader"]["workers"] == 1 and section["loader"]["img_per_s"] > 0
    assert section["stages"]["batches"] == 3
    assert section["stages"]["decode_ms_per_batch"] > 0 and section["stages"]["augment_ms_per_batch"] > 0
    step = section["step"]
    assert step["img_size"] == 16 and step["synthetic_ms_per_step"] > 0 and step["real_jpeg_ms_per_step"] > 0
    assert step["real_vs_synthetic"] == pytest.approx(step["real_jpeg_ms_per_step"] / step["synthetic_ms_per_step"],
                                                      rel=1e-2)
    assert result["environment"]["claims"] is False  # a CPU run of the GPU section claims nothing
    with pytest.raises(SystemExit):
        bench_data.main(["--device", "cpu", "--steps", "0", "--out", str(tmp_path)])
