"""Training data: the embedded Fashion-MNIST subset, ImageNet-layout folders and synthetic batches.

Every random choice of a sample (crop, flip and its MAE mask noise) is drawn from a generator seeded by
(seed, epoch, index), so a batch depends only on its position in the run: not on the number of
DataLoader workers, not on the rank that loads it, not on whether the run was resumed. That is what
makes ``--resume`` exact mid-epoch and a 2-rank run equal to a 1-rank run on the same global batch.
"""

from __future__ import annotations

import math
import os
import signal
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
FASHION_MNIST_FILE = os.path.join(DATA_DIR, "fashion_mnist_subset.npz")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Mean and std of the embedded Fashion-MNIST training subset, pixel values in [0, 1].
FASHION_MNIST_MEAN = (0.2867,)
FASHION_MNIST_STD = (0.3540,)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Pixels (width x height) above which an image file is refused as a decompression bomb: Pillow's default
#: warning threshold (about 9,459 x 9,459), applied whatever Pillow's own setting.
MAX_IMAGE_PIXELS = 89_478_485
_SEED_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (splitmix64 of the three numbers)."""
    x = (seed * 1_000_003 + epoch) * 2_147_483_647 + index
    x = (x + _SEED_MIX) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


# --- sources: uint8 images [C, H, W] with a label --------------------------------------------------------


@dataclass(frozen=True, order=True)
class BadImage:
    """An image file that was not used, and why (records sort by path, then reason)."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class UnreadableImage(Exception):
    """Raised by a source's ``read`` for a file it cannot decode; ``record`` says which and why."""

    def __init__(self, record: BadImage):
        super().__init__(str(record))
        self.record = record


class FashionMNISTSubset(Dataset):
    """The embedded Fashion-MNIST subset (MIT, (c) Zalando SE): 10,000 train / 2,000 test images,
    28x28 greyscale. Items are (uint8 tensor [1, 28, 28], int label)."""

    def __init__(self, split: str = "train", path: str = FASHION_MNIST_FILE):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"the embedded data file is missing: {path} (reinstall mae_fast)")
        with np.load(path, allow_pickle=False) as archive:
            self.images = torch.from_numpy(archive[f"{split}_images"].copy()).unsqueeze(1)
            self.labels = torch.from_numpy(archive[f"{split}_labels"].astype(np.int64))
            self.classes = [str(c) for c in archive["classes"]]
        self.missing_classes: list[str] = []  # both splits hold every class
        self.in_chans = 1
        self.mean, self.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def load(self, index: int) -> tuple[torch.Tensor, int, list[BadImage]]:
        return *self.read(index), []


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def list_image_files(folder: str, skipped: list[BadImage]) -> list[str]:
    """The image files under ``folder`` (sorted by folder path, then name; sub-folders and links followed),
    each real file once: a folder reached again through a link (a loop) is not walked again. Names with an
    image extension that are not regular files (FIFOs, devices, sockets, broken links) and folders that
    cannot be listed are left out and appended to ``skipped``."""
    seen_folders, walked = set(), []

    def unlistable(error: OSError) -> None:
        skipped.append(BadImage(error.filename, f"cannot list the folder: {error.strerror or error}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_folders:
            dirnames.clear()
            continue
        seen_folders.add(real)
        dirnames.sort()
        walked.append((dirpath, filenames))
    seen_files, paths = set(), []
    for dirpath, filenames in sorted(walked):
        for filename in sorted(filenames):
            if not filename.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, filename)
            try:
                mode = os.stat(path).st_mode
            except OSError as error:
                skipped.append(BadImage(path, f"cannot stat: {error.strerror or error}"))
                continue
            real = os.path.realpath(path)
            if not stat.S_ISREG(mode):
                skipped.append(BadImage(path, f"{_file_kind(mode)}, not an image file"))
            elif real not in seen_files:
                seen_files.add(real)
                paths.append(path)
    return paths


def _to_uint8_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] of a Pillow image: 16-bit greyscale (modes I;16*, I) scaled from [0, 65535] and float
    greyscale (mode F) from [0, 1] to [0, 255] with rounding; every other mode through Pillow's RGB."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        full_scale = 1.0 if image.mode == "F" else 65535.0
        values = np.nan_to_num(np.asarray(image, dtype=np.float64) / full_scale, nan=0.0)
        grey = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image_file(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """uint8 [3, H, W] of the image file at ``path``. Only a regular file is read (a FIFO would block);
    an image of more than ``max_pixels`` pixels (a decompression bomb) is refused before its pixels are
    decoded. Raises :class:`UnreadableImage` with the reason for any file it cannot use."""
    from PIL import Image

    try:
        # O_NONBLOCK: opening a FIFO returns at once, and fstat of the open file then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise UnreadableImage(BadImage(path, f"{_file_kind(mode)}, not an image file"))
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as image:
                    if image.width * image.height > max_pixels:
                        reason = f"{image.width}x{image.height} pixels, above the limit of {max_pixels}"
                        raise UnreadableImage(BadImage(path, f"decompression bomb: {reason}"))
                    array = _to_uint8_rgb(image)
    except UnreadableImage:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means "unreadable image"
        raise UnreadableImage(BadImage(path, f"{type(error).__name__}: {error}")) from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ImageFolderSource(Dataset):
    """An ImageNet-layout folder: ``root/<class>/<image>``; classes are the sorted sub-folder names, or
    ``classes`` when given (the training split's, so that a label means the same class in every split:
    a sub-folder outside ``classes`` is an error; ``missing_classes`` are those without a listed image).

    Images are decoded by :func:`decode_image_file`. Files that are not images (FIFOs, devices, sockets)
    and folders that cannot be listed are left out when listing, with a warning, and kept in ``skipped``.
    :meth:`read` raises for an unreadable image; :meth:`load` replaces it by the next readable one and
    reports it, so a training epoch never stops and every batch keeps its size; the training loop warns
    once per path and counts.
    """

    def __init__(self, root: str, classes: list[str] | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
        if not os.path.isdir(root):
            raise ValueError(f"data_path: folder not found: {root}")
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.root = root
        self.max_pixels = max_pixels
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not folders:
            raise ValueError(f"data_path: {root} has no class sub-folders (expected root/<class>/<image>)")
        self.classes = folders if classes is None else list(classes)
        unknown = [name for name in folders if name not in self.classes]
        if unknown:
            raise ValueError(f"data_path: {root} has class folder(s) {unknown} that the training split lacks")
        self.skipped: list[BadImage] = []
        self.samples: list[tuple[str, int]] = []
        for name in folders:
            label = self.classes.index(name)
            for path in list_image_files(os.path.join(root, name), self.skipped):
                self.samples.append((path, label))
        if self.skipped:
            listed = "; ".join(str(record) for record in self.skipped[:3])
            message = f"{root}: left out {len(self.skipped)} path(s) that are not image files: {listed}"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        if not self.samples:
            raise ValueError(f"data_path: no images with extensions {IMAGE_EXTENSIONS} under {root}")
        present = {label for _, label in self.samples}
        self.missing_classes = [name for label, name in enumerate(self.classes) if label not in present]
        self.in_chans = 3
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[torch.Tensor, int]:
        """(uint8 [3, H, W], label) of sample ``index``; raises :class:`UnreadableImage`."""
        path, label = self.samples[index]
        return decode_image_file(path, self.max_pixels), label

    def load(self, index: int) -> tuple[torch.Tensor, int, list[BadImage]]:
        """(uint8 [3, H, W], label, []) of sample ``index``, or when it is unreadable the next readable
        image with the one record of this sample's file (the files tried after it are reported when
        their own index is loaded, so each bad file is counted once per epoch that draws it)."""
        failures: list[BadImage] = []
        for offset in range(len(self.samples)):
            try:
                return *self.read((index + offset) % len(self.samples)), failures[:1]
            except UnreadableImage as error:
                failures.append(error.record)
        listed = "; ".join(str(record) for record in failures[:3])
        raise RuntimeError(f"no readable image under {self.root}: {listed}")


# --- augmentation --------------------------------------------------------------------------------------


def random_resized_crop_box(
    height: int, width: int, generator: torch.Generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop draws them, from ``generator``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2] * (height - h + 1)), height - h)
            left = min(int(u[3] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """float [C, h, w] in [0, 1] -> [C, size, size], bicubic with antialiasing, clamped to [0, 1]."""
    if img.shape[-2:] == (size, size):
        return img
    out = F.interpolate(img[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def center_crop_box(height: int, width: int, crop_fraction: float) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the centred square covering ``crop_fraction`` of the shorter side."""
    side = max(1, int(round(min(height, width) * crop_fraction)))
    return (height - side) // 2, (width - side) // 2, side, side


class MAEDataset(Dataset):
    """Wraps a source into model inputs. Indexed by (epoch, index) pairs from :class:`ResumableSampler`.

    Items are dicts: ``imgs`` float32 [C, S, S] (normalised), ``noise`` float32 [num_patches] (the MAE
    mask noise of this sample, uniform [0, 1)), ``label`` int64 and ``bad`` (a list: the :class:`BadImage`
    of this sample's file when it was unreadable and replaced, else empty).
    ``train=True``: RandomResizedCrop(S, scale (0.2, 1), bicubic) + horizontal flip; else a centre crop
    (all of a square image) resized to S.
    """

    def __init__(self, source, img_size: int, num_patches: int, seed: int, train: bool = True):
        self.source = source
        self.img_size = img_size
        self.num_patches = num_patches
        self.seed = seed
        self.train = train
        self.mean = torch.tensor(source.mean).view(-1, 1, 1)
        self.std = torch.tensor(source.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        raw, label, bad = self.source.load(index)
        imgs, noise = self.transform(raw, epoch, index)
        return {"imgs": imgs, "noise": noise, "label": label, "bad": bad}

    def transform(self, raw: torch.Tensor, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised imgs [C, S, S], noise [num_patches]) of the uint8 image ``raw`` as sample ``index``."""
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        _, height, width = raw.shape
        if self.train:
            top, left, h, w = random_resized_crop_box(height, width, generator)
        else:
            top, left, h, w = center_crop_box(height, width, 1.0 if height == width else 0.875)
        img = _resize(raw[:, top : top + h, left : left + w].float().div_(255.0), self.img_size)
        if self.train and bool(torch.rand((), generator=generator) < 0.5):
            img = img.flip(-1)
        noise = torch.rand(self.num_patches, generator=generator)
        return (img - self.mean) / self.std, noise


def collate(items: list[dict]) -> dict:
    return {
        "imgs": torch.stack([item["imgs"] for item in items]),
        "noise": torch.stack([item["noise"] for item in items]),
        "label": torch.tensor([item["label"] for item in items], dtype=torch.int64),
        "bad": [record for item in items for record in item["bad"]],
    }


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (shuffled per epoch, ``drop_last``) that yields (epoch, index) pairs
    and can start part-way into an epoch: ``set_position(epoch, skip)`` skips this rank's first ``skip``
    samples. Rank r takes every world-th index of the epoch's permutation, so the union of the ranks'
    i-th micro-batches is the i-th micro-batch of a 1-rank run with world times the batch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip


@dataclass
class TrainData:
    """What the loop needs: the loader (or synthetic generator), its sampler and the epoch length."""

    loader: object
    sampler: ResumableSampler | None
    steps_per_epoch: int
    in_chans: int
    img_size: int
    source: object | None

    def start(self, epoch: int, micro_batches_done: int, micro_batch: int) -> Iterator[dict]:
        """An iterator over the rest of ``epoch``, after ``micro_batches_done`` micro-batches."""
        if self.sampler is None:
            return self.loader.iterate(epoch, micro_batches_done)
        self.sampler.set_position(epoch, micro_batches_done * micro_batch)
        return iter(self.loader)

    def close(self) -> None:
        """Shut the loader's persistent workers down (a no-op for synthetic data or without workers)."""
        shutdown_workers(getattr(self.loader, "loader", self.loader))


def shutdown_workers(loader) -> None:
    """Shut a DataLoader's persistent workers down now. They ignore SIGTERM (:func:`ignore_stop_signals`), and
    a loader can outlive its run in a reference cycle (a caught exception's traceback holds the frames):
    workers still running at interpreter exit would block it, as multiprocessing's exit hook terminates
    daemon processes with SIGTERM and then joins them. torch's DataLoader has no public close."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        loader._iterator = None
        iterator._shutdown_workers()


class SyntheticBatches:
    """Random images made on the device, one seeded generator per (epoch, micro-batch, rank): for
    throughput runs, where host-side data loading must not be the bottleneck."""

    def __init__(self, micro_batch, in_chans, img_size, num_patches, per_epoch, seed, rank, device):
        self.shape = (micro_batch, in_chans, img_size, img_size)
        self.num_patches = num_patches
        self.per_epoch = per_epoch
        self.seed, self.rank, self.device = seed, rank, torch.device(device)

    def iterate(self, epoch: int, start: int) -> Iterator[dict]:
        generator = torch.Generator(device=self.device)
        for i in range(start, self.per_epoch):
            generator.manual_seed(sample_seed(self.seed, epoch, i * 65_536 + self.rank))
            imgs = torch.randn(self.shape, generator=generator, device=self.device)
            noise = torch.rand(self.shape[0], self.num_patches, generator=generator, device=self.device)
            yield {"imgs": imgs, "noise": noise, "label": None, "bad": []}


def build_source(config, split: str = "train", classes: list[str] | None = None):
    """The labelled source of ``config.data`` for ``split`` "train" or "test": the embedded subset's
    split, or for an ImageFolder DIR/train (else DIR itself) and DIR/val (else DIR/test), labelled by
    ``classes`` when given (pass the training source's, see :class:`ImageFolderSource`)."""
    if config.data == "fashion-mnist":
        return FashionMNISTSubset(split)
    if config.data == "imagefolder":
        if split == "train":
            train = os.path.join(config.data_path, "train")
            return ImageFolderSource(train if os.path.isdir(train) else config.data_path, classes)
        for name in ("val", "test"):
            if os.path.isdir(os.path.join(config.data_path, name)):
                return ImageFolderSource(os.path.join(config.data_path, name), classes)
        raise ValueError(f"data_path: {config.data_path} has no val/ or test/ folder to evaluate on")
    raise ValueError(f"data={config.data!r} has no labelled source")


def default_img_size(config, model_img_size: int) -> int:
    if config.img_size is not None:
        return config.img_size
    return 28 if config.data == "fashion-mnist" else model_img_size


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM / SIGINT: a signal to the whole process group (a batch scheduler,
    Ctrl-C) then reaches the main process alone, which checkpoints and stops the workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def resumable_loader(config, dataset, collate_fn, world_size: int, rank: int, device):
    """(DataLoader, ResumableSampler, optimizer steps per epoch) of ``dataset`` for this rank: micro-batches
    of config.micro_batch(world_size), workers that ignore stop signals, pinned memory for CUDA."""
    micro_batch = config.micro_batch(world_size)
    sampler = ResumableSampler(dataset, world_size, rank, config.seed)
    steps = sampler.num_samples // micro_batch // config.accum_steps
    if steps < 1:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {len(dataset)} images of the training set")
    workers = config.num_workers
    loader = DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.device(device).type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
    )
    return loader, sampler, steps


def build_train_data(config, img_size: int, num_patches: int, world_size: int, rank: int, device) -> TrainData:
    """The training stream of ``config`` for this rank (micro-batches of config.micro_batch(world_size))."""
    micro_batch = config.micro_batch(world_size)
    if config.data == "synthetic":
        per_epoch = max(1, 10_000 // (micro_batch * world_size))
        steps = per_epoch // config.accum_steps
        if steps < 1:
            raise ValueError("synthetic data: batch_size too large for a 10,000-image epoch")
        batches = SyntheticBatches(micro_batch, 3, img_size, num_patches, per_epoch, config.seed, rank, device)
        return TrainData(batches, None, steps, 3, img_size, None)
    source = build_source(config, "train")
    dataset = MAEDataset(source, img_size, num_patches, config.seed, train=True)
    loader, sampler, steps = resumable_loader(config, dataset, collate, world_size, rank, device)
    return TrainData(loader, sampler, steps, source.in_chans, img_size, source)


def report_bad(records: list[BadImage], seen: set[str]) -> int:
    """Warn once per unreadable file (``seen`` holds the paths warned about); returns len(records)."""
    for record in records:
        if record.path not in seen:
            seen.add(record.path)
            warnings.warn(f"skipped unreadable image {record}", RuntimeWarning, stacklevel=2)
    return len(records)


def eval_batches(
    source, img_size: int, batch_size: int, limit: int | None = None, unreadable: list[BadImage] | None = None
) -> Iterator[tuple]:
    """(imgs float32 [B, C, S, S] normalised, labels int64 [B]) over the first ``limit`` images of ``source``
    without augmentation. An unreadable image is left out, not replaced (a score must not count a copy of
    its neighbour): its record is appended to ``unreadable`` when given."""
    dataset = MAEDataset(source, img_size, 1, seed=0, train=False)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        imgs, labels = [], []
        for index in range(start, min(n, start + batch_size)):
            try:
                raw, label = source.read(index)
            except UnreadableImage as error:
                if unreadable is not None:
                    unreadable.append(error.record)
                continue
            imgs.append(dataset.transform(raw, 0, index)[0])
            labels.append(label)
        if imgs:
            yield torch.stack(imgs), torch.tensor(labels, dtype=torch.int64)
