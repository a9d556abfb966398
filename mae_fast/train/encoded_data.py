"""The device pipelines: DataLoader workers hand over bytes or uint8 pixels, the model's device augments.

The bytes pipeline (ImageFolder data): DataLoader workers read encoded files, the main process decodes and
augments batches.

A worker reads a file's bytes, reads its size from the header (Pillow parses the header only) and draws the
sample's crop box, flip and MAE mask noise from the (seed, epoch, index) generator in the same order as
:class:`mae_fast.train.data.MAEDataset`, so every batch is the same pure function of its position as in the
pixel pipeline (exact resume, rank independence). Batches travel as one flat uint8 buffer of encoded bytes
with per-file offsets (pinned when the model runs on CUDA).

:class:`BatchDecoder` decodes a batch where the model runs: one ``torchvision.io.decode_jpeg(list,
device=...)`` call for the baseline RGB / greyscale JPEGs (nvJPEG on a GPU, libjpeg on the CPU), a per-image
CPU path (``decode_image``, then Pillow) for everything else (PNG, CMYK, 16-bit, files the batched call
refuses), and then ``mae_fast.ops.resized_crop`` (crop, bicubic antialiased resize, flip, normalisation) for
the model-ready batch. An unreadable file is reported with its path, replaced by the next readable file of
the folder (as :meth:`ImageFolderSource.load` replaces it) and counted by the loop's ``report_bad``.

The pixel pipeline on the device (the embedded Fashion-MNIST subset, already uint8): workers hand over each
sample's uint8 image with its crop box, flip and noise drawn in the same order (:class:`PixelDataset`,
:func:`collate_pixels`), and :class:`PixelBatchAugmenter` runs ``resized_crop`` where the model runs.

:class:`DecodedBatches` is what the loop iterates: on CUDA it decodes (or augments) the next batch on a side
stream while the current step runs; on the CPU it decodes each batch when it is asked for.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, get_worker_info

from mae_fast.train.data import (
    BadImage,
    ImageFolderSource,
    TrainData,
    UnreadableImage,
    build_source,
    decode_image_file,
    random_resized_crop_box,
    resumable_loader,
    sample_seed,
)

#: Pillow modes of JPEGs that the batched decode takes; every other file goes through the CPU path.
BATCH_DECODE_MODES = ("L", "RGB")


def draw_sample(seed: int, epoch: int, index: int, height: int, width: int, num_patches: int):
    """(box (top, left, h, w), flip, noise [num_patches]) of sample ``index`` of ``epoch`` for an image of
    ``height`` x ``width``: the same draws, in the same order, as MAEDataset makes for training."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    box = random_resized_crop_box(height, width, generator)
    flip = bool(torch.rand((), generator=generator) < 0.5)
    noise = torch.rand(num_patches, generator=generator)
    return box, flip, noise


# JPEG frame headers (SOFn) and the ones the batched decode takes: baseline, extended and progressive Huffman
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_BATCH_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2))


def jpeg_header(data: bytes | bytearray) -> tuple[int, int, bool] | None:
    """(height, width, batch_decodable) from a JPEG's frame header, walking the marker segments before it;
    None when ``data`` is not a JPEG whose frame header this walk finds (then Pillow reads the header).
    Batch-decodable: a Huffman-coded frame (baseline, extended, progressive) of 1 or 3 components."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        elif marker in _SOF_MARKERS:
            if pos + 10 > end:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            if height == 0 or width == 0:  # a height set later by a DNL segment: let Pillow say
                return None
            return height, width, marker in _BATCH_SOF_MARKERS and data[pos + 9] in (1, 3)
        else:
            pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return None


def read_encoded(path: str, max_pixels: int) -> tuple[torch.Tensor, int, int, bool]:
    """(bytes uint8 [N], height, width, batch_decodable) of the image file at ``path``, its pixels not
    decoded. Raises :class:`UnreadableImage` for what ``decode_image_file`` refuses before decoding: not a
    regular file (a FIFO would block), a header that cannot be read, more than ``max_pixels`` pixels.
    JPEG headers are read by :func:`jpeg_header`, other formats' by Pillow."""
    try:
        # O_NONBLOCK: opening a FIFO returns at once, and fstat of the open file then refuses it
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb", buffering=0) as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise UnreadableImage(BadImage(path, "not a regular file, not an image file"))
            data = bytearray(status.st_size)
            data = data[: file.readinto(data)]
        header = jpeg_header(data)
        height, width, batch_decodable = _pillow_header(data) if header is None else header
    except UnreadableImage:
        raise
    except Exception as error:  # noqa: BLE001 - any reader failure means "unreadable image"
        raise UnreadableImage(BadImage(path, f"{type(error).__name__}: {error}")) from error
    if width * height > max_pixels:
        reason = f"decompression bomb: {width}x{height} pixels, above the limit of {max_pixels}"
        raise UnreadableImage(BadImage(path, reason))
    return torch.frombuffer(data, dtype=torch.uint8), height, width, batch_decodable


def _pillow_header(data: bytearray) -> tuple[int, int, bool]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return height, width, image.format == "JPEG" and image.mode in BATCH_DECODE_MODES
    except UnidentifiedImageError:  # its message names the in-memory buffer's address: one text per file
        raise UnidentifiedImageError(f"not an image format Pillow knows ({len(data)} bytes)") from None


class _SampleDrawingDataset(Dataset):
    """A source whose samples draw their crop box, flip and mask noise from (seed, epoch, index)."""

    def __init__(self, source, num_patches: int, seed: int):
        self.source = source
        self.num_patches = num_patches
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)


class EncodedImageDataset(_SampleDrawingDataset):
    """An ImageFolderSource as encoded training samples, indexed by (epoch, index) from ResumableSampler.

    Items are dicts: ``data`` uint8 [N] (the file's bytes), ``box`` (top, left, h, w) drawn from the header's
    size, ``flip`` bool, ``noise`` float32 [num_patches], ``label``, ``key`` (epoch, index, position of the
    file read in the source), ``size`` (height, width) from the header, ``batch_decodable`` and ``bad`` (as
    MAEDataset's: the BadImage of this sample's file when its header was unreadable and the next readable
    file replaced it, else empty).
    """

    source: ImageFolderSource

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        samples = self.source.samples
        failures: list[BadImage] = []
        for offset in range(len(samples)):
            position = (index + offset) % len(samples)
            path, label = samples[position]
            try:
                data, height, width, batch_decodable = read_encoded(path, self.source.max_pixels)
            except UnreadableImage as error:
                failures.append(error.record)
                continue
            box, flip, noise = draw_sample(self.seed, epoch, index, height, width, self.num_patches)
            return {
                "data": data,
                "box": box,
                "flip": flip,
                "noise": noise,
                "label": label,
                "key": (epoch, index, position),
                "size": (height, width),
                "batch_decodable": batch_decodable,
                "bad": failures[:1],
            }
        raise RuntimeError(f"no readable image under {self.source.root}: {'; '.join(map(str, failures[:3]))}")


def _shared_bytes(count: int) -> torch.Tensor | None:
    """In a DataLoader worker, uint8 [count] in shared memory (the batch travels in it, not copied
    again); None in the main process."""
    if get_worker_info() is None:
        return None
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(count))


def collate_encoded(items: list[dict]) -> dict:
    """One flat byte buffer with offsets int64 [B + 1], and the per-sample draws as tensors (all the small
    numbers go through one table: one tensor made per batch, not one per field)."""
    offsets = [0]
    for item in items:
        offsets.append(offsets[-1] + item["data"].numel())
    table = torch.tensor(
        [(*item["box"], *item["key"], *item["size"], item["label"], item["flip"], item["batch_decodable"])
         for item in items],
        dtype=torch.int64,
    )
    return {
        "data": torch.cat([item["data"] for item in items], out=_shared_bytes(offsets[-1])),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "boxes": table[:, 0:4].contiguous(),
        "keys": table[:, 4:7],
        "sizes": table[:, 7:9],
        "label": table[:, 9].contiguous(),
        "flip": table[:, 10].bool(),
        "batch_decodable": table[:, 11].bool(),
        "noise": torch.stack([item["noise"] for item in items]),
        "bad": [record for item in items for record in item["bad"]],
    }


def decode_on_cpu(data: torch.Tensor, path: str, max_pixels: int) -> torch.Tensor:
    """uint8 [3, H, W] of one file's bytes on the CPU: torchvision's decode_image (16-bit values scaled to
    [0, 255] with rounding, as the pixel pipeline scales them), else the pixel pipeline's own Pillow decode
    of ``path``; raises :class:`UnreadableImage` when neither can read it."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        return decode_image_file(path, max_pixels)
    if image.dtype == torch.uint16:
        image = image.to(torch.float32).mul_(255.0 / 65535.0).round_().to(torch.uint8)
    return image


class BatchDecoder:
    """Collated encoded batches -> the dict TrainData yields: ``imgs`` [B, 3, S, S] normalised in ``dtype``
    on ``device``, ``noise`` [B, num_patches] on ``device``, ``label`` int64 [B] and ``bad`` (BadImage records).

    ``crop`` is ``mae_fast.ops.resized_crop`` unless another function with its signature is given.
    """

    def __init__(
        self,
        source: ImageFolderSource,
        img_size: int,
        num_patches: int,
        seed: int,
        device,
        dtype: torch.dtype = torch.float32,
        crop: Callable | None = None,
    ):
        if crop is None:
            from mae_fast.ops.resized_crop import resized_crop as crop
        self.source = source
        self.img_size = img_size
        self.num_patches = num_patches
        self.seed = seed
        self.device = torch.device(device)
        self.dtype = dtype
        self.crop = crop

    def __call__(self, batch: dict) -> dict:
        offsets = batch["offsets"].tolist()
        chunks = [batch["data"][start:end] for start, end in zip(offsets[:-1], offsets[1:], strict=True)]
        images = self.decode_jpegs(chunks, batch["batch_decodable"].tolist())
        boxes, flip, noise, labels = batch["boxes"], batch["flip"], batch["noise"], batch["label"]
        bad = list(batch["bad"])
        rows = zip(batch["keys"].tolist(), batch["sizes"].tolist(), strict=True)
        for i, ((epoch, index, position), header_size) in enumerate(rows):
            replaced = False
            if images[i] is None:
                path = self.source.samples[position][0]
                try:
                    image = decode_on_cpu(chunks[i], path, self.source.max_pixels)
                    images[i] = image.to(self.device, non_blocking=True)
                except UnreadableImage as error:
                    bad.append(error.record)
                    images[i], labels[i] = self._next_readable(position, error.record)
                    replaced = True
            size = list(images[i].shape[1:])
            if replaced or size != header_size:  # draw as the pixel pipeline does, from the decoded size
                box, flip[i], noise[i] = draw_sample(self.seed, epoch, index, *size, self.num_patches)
                boxes[i] = torch.tensor(box)
        imgs = self.crop(
            images, boxes, self.img_size, flip=flip, mean=self.source.mean, std=self.source.std, dtype=self.dtype
        )
        return {"imgs": imgs, "noise": noise.to(self.device, non_blocking=True), "label": labels, "bad": bad}

    def decode_jpegs(self, chunks: list[torch.Tensor], batch_decodable: list[bool]) -> list[torch.Tensor | None]:
        """The batch-decodable files decoded on the device in one call (one by one when the call fails);
        None for the others and for those the device decoder refused."""
        from torchvision.io import ImageReadMode, decode_jpeg

        images: list[torch.Tensor | None] = [None] * len(chunks)
        chosen = [i for i, ok in enumerate(batch_decodable) if ok]
        if not chosen:
            return images
        try:
            decoded = decode_jpeg([chunks[i] for i in chosen], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one file it cannot read fails the whole call
            decoded = []
            for i in chosen:
                try:
                    decoded.append(decode_jpeg(chunks[i], mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(chosen, decoded, strict=True):
            images[i] = image
        return images

    def _next_readable(self, position: int, record: BadImage) -> tuple[torch.Tensor, int]:
        """(image on the device, label) of the first readable file after ``position``, as
        ImageFolderSource.load replaces an unreadable one (the files passed over are not reported here:
        each is reported when its own sample is drawn). ``record`` (the unreadable file's) heads the error
        when no file of the folder can be read."""
        samples = self.source.samples
        failures = [record]
        for offset in range(1, len(samples)):
            path, label = samples[(position + offset) % len(samples)]
            try:
                data = read_encoded(path, self.source.max_pixels)[0]
                return decode_on_cpu(data, path, self.source.max_pixels).to(self.device, non_blocking=True), label
            except UnreadableImage as error:
                failures.append(error.record)
        raise RuntimeError(f"no readable image under {self.source.root}: {'; '.join(map(str, failures[:3]))}")


class DecodedBatches:
    """Iterating it starts ``loader`` and yields ``decoder``'s batches. On CUDA the next batch is decoded
    and augmented on a side stream while the caller runs its step on the current stream (no host sync: the
    current stream waits on the side stream when the batch is handed over); on the CPU one after another."""

    def __init__(self, loader, decoder: BatchDecoder | PixelBatchAugmenter):
        self.loader = loader
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.loader)
        if self.decoder.device.type != "cuda":
            for batch in batches:
                yield self.decoder(batch)
            return
        side = torch.cuda.Stream(self.decoder.device)
        pending = self._ahead(batches, side)
        while pending is not None:
            current = torch.cuda.current_stream(self.decoder.device)
            current.wait_stream(side)
            for tensor in (pending["imgs"], pending["noise"]):
                tensor.record_stream(current)
            ready, pending = pending, self._ahead(batches, side)
            yield ready

    def _ahead(self, batches, side) -> dict | None:
        batch = next(batches, None)
        if batch is None:
            return None
        with torch.cuda.stream(side):
            return self.decoder(batch)


class PixelDataset(_SampleDrawingDataset):
    """A source of decoded uint8 images (the embedded Fashion-MNIST subset) as training samples whose
    augmentation runs later, on the model's device; indexed by (epoch, index) from ResumableSampler.

    Items are dicts: ``image`` uint8 [C, H, W] (``source.load``'s: a replacement when the sample's file was
    unreadable, as MAEDataset takes it), ``box`` (top, left, h, w), ``flip`` and ``noise`` [num_patches]
    drawn from the image's size by :func:`draw_sample` (MAEDataset's draws, in its order), ``label`` and
    ``bad`` (MAEDataset's).
    """

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label, bad = self.source.load(index)
        box, flip, noise = draw_sample(self.seed, epoch, index, *image.shape[1:], self.num_patches)
        return {"image": image, "box": box, "flip": flip, "noise": noise, "label": label, "bad": bad}


def collate_pixels(items: list[dict]) -> dict:
    """The images in one flat uint8 buffer (in a worker, in shared memory) with offsets int64 [B + 1] and
    shapes int64 [B, 3] (C, H, W), and the draws as tensors (one table for the small numbers)."""
    offsets = [0]
    for item in items:
        offsets.append(offsets[-1] + item["image"].numel())
    table = torch.tensor(
        [(*item["box"], *item["image"].shape, item["label"], item["flip"]) for item in items], dtype=torch.int64
    )
    return {
        "pixels": torch.cat([item["image"].reshape(-1) for item in items], out=_shared_bytes(offsets[-1])),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "shapes": table[:, 4:7],
        "boxes": table[:, 0:4].contiguous(),
        "label": table[:, 7].contiguous(),
        "flip": table[:, 8].bool(),
        "noise": torch.stack([item["noise"] for item in items]),
        "bad": [record for item in items for record in item["bad"]],
    }


class PixelBatchAugmenter:
    """Collated pixel batches -> the dict TrainData yields: the flat uint8 buffer copied to ``device`` in one
    transfer (non_blocking; pinned by the DataLoader on CUDA), then ``crop`` (``mae_fast.ops.resized_crop``
    unless another function with its signature is given): ``imgs`` [B, C, S, S] normalised with the source's
    mean / std in ``dtype``, ``noise`` [B, num_patches] on ``device``, ``label`` int64 [B] and ``bad``."""

    def __init__(self, source, img_size: int, device, dtype: torch.dtype = torch.float32, crop: Callable | None = None):
        if crop is None:
            from mae_fast.ops.resized_crop import resized_crop as crop
        self.mean, self.std = source.mean, source.std
        self.img_size = img_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.crop = crop

    def __call__(self, batch: dict) -> dict:
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        offsets = batch["offsets"].tolist()
        images = [
            pixels[start:end].view(*shape)
            for start, end, shape in zip(offsets[:-1], offsets[1:], batch["shapes"].tolist(), strict=True)
        ]
        imgs = self.crop(
            images, batch["boxes"], self.img_size, flip=batch["flip"], mean=self.mean, std=self.std, dtype=self.dtype
        )
        noise = batch["noise"].to(self.device, non_blocking=True)
        return {"imgs": imgs, "noise": noise, "label": batch["label"], "bad": batch["bad"]}


def build_encoded_train_data(
    config, img_size: int, num_patches: int, world_size: int, rank: int, device, crop: Callable | None = None
) -> TrainData:
    """The training stream of ``config`` for this rank with augmentation on ``device``: ImageFolder data
    through the bytes pipeline, the embedded Fashion-MNIST subset as uint8 pixels. The same sampler,
    positions and batches of config.micro_batch(world_size) as data.build_train_data."""
    if config.data not in ("imagefolder", "fashion-mnist"):
        raise ValueError(
            f"the device pipelines read ImageFolder data or the embedded fashion-mnist subset, got data={config.data!r}"
        )
    source = build_source(config, "train")
    if config.data == "imagefolder":
        dataset, collate = EncodedImageDataset(source, num_patches, config.seed), collate_encoded
        decoder = BatchDecoder(source, img_size, num_patches, config.seed, device, crop=crop)
    else:
        dataset, collate = PixelDataset(source, num_patches, config.seed), collate_pixels
        decoder = PixelBatchAugmenter(source, img_size, device, crop=crop)
    loader, sampler, steps = resumable_loader(config, dataset, collate, world_size, rank, device)
    return TrainData(DecodedBatches(loader, decoder), sampler, steps, source.in_chans, img_size, source)
