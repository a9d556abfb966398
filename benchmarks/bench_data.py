"""The input pipeline: the release's Pillow pipeline against mae_fast's bytes pipeline, and its device stages.

``python -m benchmarks.bench_data [--rounds 7] [--batch 56] [--threads 1] [--out benchmarks/results]``
(the CPU section) or ``python -m benchmarks.bench_data --device cuda [--workers 16] [--batch 256]
[--loader-batches 40] [--steps 20] [--model vit_b]`` (the device section, see :func:`measure_device`).

The images are scikit-image's bundled photos (real photographs), centre-cropped to 4:3 and resized to
500x375 (portrait ones to 375x500), saved as JPEG quality 90 into an ImageFolder in a temporary folder.
Three pipelines run on the same samples, one worker's work in this process (``--threads`` torch threads):

* ``pillow_release``: what a DataLoader worker of the MAE release does per image: PIL open, RandomResizedCrop
  (224, scale (0.2, 1), bicubic), RandomHorizontalFlip, ToTensor, Normalize (torchvision.transforms);
* ``bytes_host_share``: the host's share of the bytes pipeline when decoding runs on the device: a worker's
  EncodedImageDataset item (read the bytes, parse the header, draw the box, flip and mask noise) and
  collate_encoded (packing one byte buffer). Pinning needs CUDA and is not part of a CPU run;
* ``bytes_all_cpu``: the same plus BatchDecoder on the CPU: one decode_jpeg call for the batch and
  mae_fast.ops.resized_crop (224, flip, ImageNet mean / std, float32) on the CPU.

Rounds are interleaved (one round of each pipeline in turn, the order changing every round:
``harness.balanced_rounds``) so that load from other processes on a shared machine hits all three alike;
the medians over rounds are reported. ``cpu_ms_per_image`` is the process's
CPU time per image, ``wall_ms_per_image`` its wall time and ``img_per_s_per_worker`` 1000 / wall ms.
These are CPU numbers, measured on the machine named in the JSON's environment.

The device section (``--device``; on a GPU it is what the issue asks to measure, ``--device cpu --model
tiny`` runs the same code as a smoke test) uses the same photos, many samples of each (every sample index
draws its own box, flip and noise), and measures: the DataLoader alone (``--workers`` workers reading bytes,
drawing, packing, pinned on CUDA), img/s after its first batch; the decode stage (one batched
``decode_jpeg`` on the device) and the augment stage (``resized_crop`` to the model's size, float32 as the
training loop writes it) per batch, synchronised around each stage; and the MAE training step (forward,
backward, fused AdamW, bf16 autocast on CUDA) fed by the whole bytes pipeline (``DecodedBatches``: the
loader plus decode and augment on a side stream) against the same step on synthetic batches made on the
device; the gap is the loader's cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import bench_train, harness

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
LANDSCAPE = (500, 375)
NUM_PATCHES = 196  # ViT-B/16 at 224
IMG_SIZE = 224


def write_photos(root: str, quality: int = 90) -> list[str]:
    """root/photos/<name>.jpg for every bundled photo, 500x375 or 375x500; returns the paths."""
    import skimage.data
    from PIL import Image

    folder = os.path.join(root, "photos")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        width, height = LANDSCAPE if image.width >= image.height else LANDSCAPE[::-1]
        scale = min(image.width / width, image.height / height)
        crop_w, crop_h = round(width * scale), round(height * scale)
        left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.LANCZOS)
        paths.append(os.path.join(folder, f"{name}.jpg"))
        image.save(paths[-1], quality=quality)
    return paths


def pillow_release_transform():
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(IMG_SIZE, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )


def _timed(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of fn()."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def build_pipelines(root: str, batch: int) -> dict:
    """name -> a function that runs one round of ``batch`` samples through that pipeline."""
    from PIL import Image

    from mae_fast.train import data, encoded_data

    source = data.ImageFolderSource(root)
    dataset = encoded_data.EncodedImageDataset(source, NUM_PATCHES, seed=0)
    decoder = encoded_data.BatchDecoder(source, IMG_SIZE, NUM_PATCHES, 0, "cpu")
    transform = pillow_release_transform()
    keys = [(0, i % len(source)) for i in range(batch)]

    def pillow_release():
        out = []
        for _, index in keys:
            with Image.open(source.samples[index][0]) as image:
                out.append(transform(image.convert("RGB")))
        return torch.stack(out)

    def bytes_host_share():
        return encoded_data.collate_encoded([dataset[key] for key in keys])

    def bytes_all_cpu():
        return decoder(encoded_data.collate_encoded([dataset[key] for key in keys]))

    return {"pillow_release": pillow_release, "bytes_host_share": bytes_host_share, "bytes_all_cpu": bytes_all_cpu}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(rounds: int, batch: int) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory() as root:
        paths = write_photos(root)
        sizes = {}
        from PIL import Image

        for path in paths:
            with Image.open(path) as image:
                sizes[os.path.basename(path)] = [image.width, image.height, os.path.getsize(path)]
        pipelines = build_pipelines(root, batch)
        for run in pipelines.values():  # warm-up: file cache, first-call set-up
            run()
        samples = {name: [] for name in pipelines}
        for order in harness.balanced_rounds(list(pipelines), rounds):
            for name in order:
                samples[name].append(_timed(pipelines[name]))
    rows = []
    for name, timings in samples.items():
        cpu_ms = statistics.median(t[0] for t in timings) * 1000 / batch
        wall_ms = statistics.median(t[1] for t in timings) * 1000 / batch
        rows.append(
            dict(
                pipeline=name,
                cpu_ms_per_image=round(cpu_ms, 4),
                wall_ms_per_image=round(wall_ms, 4),
                img_per_s_per_worker=round(1000 / wall_ms, 1),
                wall_ms_per_image_rounds=[round(t[1] * 1000 / batch, 4) for t in timings],
            )
        )
    pillow = next(row for row in rows if row["pipeline"] == "pillow_release")
    for row in rows:
        row["wall_vs_pillow"] = round(row["wall_ms_per_image"] / pillow["wall_ms_per_image"], 4)
    return rows, sizes


#: --model of the device section: (mae_fast factory, overrides); "tiny" is for smoke runs on the CPU
DEVICE_MODELS = {"vit_b": bench_train.MODELS["vit_b"], "tiny": bench_train.SMOKE_MODELS["tiny"]}
MASK_RATIO = 0.75
STAGE_BATCHES = 5  # batches the decode and augment stages are timed on
WARMUP_STEPS = 3


def _encoded_loader(dataset, samples: int, batch: int, workers: int, device: torch.device):
    """A DataLoader of collated encoded batches over sample indices 0 .. samples - 1 of epoch 0 (the
    indices wrap around the photos, each drawing its own box), pinned for CUDA."""
    from torch.utils.data import DataLoader

    from mae_fast.train import data, encoded_data

    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=[(0, i) for i in range(samples)],
        num_workers=workers,
        collate_fn=encoded_data.collate_encoded,
        pin_memory=device.type == "cuda",
        drop_last=True,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=data.ignore_stop_signals,
    )


def _median_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1000, 4)


def measure_device(
    root: str, device: torch.device, batch: int, loader_batches: int, steps: int, workers: int, model_name: str
) -> dict:
    """The device section on the photos under ``root``: loader alone, decode and augment stages per batch,
    the training step on real JPEGs against synthetic batches. Returns the JSON's ``device_section``."""
    from mae_fast.models import create_model
    from mae_fast.ops.resized_crop import resized_crop
    from mae_fast.train import data, encoded_data

    factory, overrides = DEVICE_MODELS[model_name]
    model = create_model(factory, **overrides).to(device).train()
    img_size, num_patches = model.img_size[0], model.num_patches
    source = data.ImageFolderSource(root)
    dataset = encoded_data.EncodedImageDataset(source, num_patches, seed=0)
    decoder = encoded_data.BatchDecoder(source, img_size, num_patches, 0, device)

    # 1. the loader alone
    loader = iter(_encoded_loader(dataset, batch * loader_batches, batch, workers, device))
    begin = time.perf_counter()
    kept = [next(loader)]
    startup_s = time.perf_counter() - begin
    begin = time.perf_counter()
    for batch_data in loader:
        if len(kept) < STAGE_BATCHES:
            kept.append(batch_data)
    loader_s = time.perf_counter() - begin
    loader_row = dict(
        workers=workers,
        batches=loader_batches,
        first_batch_s=round(startup_s, 3),
        img_per_s=round(batch * (loader_batches - 1) / loader_s, 1) if loader_batches > 1 else None,
    )

    # 2. the decode and augment stages, per batch (the first pass warms both up)
    decode_s, augment_s = [], []
    for round_index in range(2):
        for batch_data in kept:
            offsets = batch_data["offsets"].tolist()
            chunks = [batch_data["data"][a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
            harness.synchronize(device)
            begin = time.perf_counter()
            images = decoder.decode_jpegs(chunks, batch_data["batch_decodable"].tolist())
            harness.synchronize(device)
            middle = time.perf_counter()
            if any(image is None for image in images):
                raise RuntimeError("a bundled photo did not decode in the batched call")
            resized_crop(
                images, batch_data["boxes"], img_size, flip=batch_data["flip"], mean=data.IMAGENET_MEAN,
                std=data.IMAGENET_STD, dtype=torch.float32,
            )  # fmt: skip
            harness.synchronize(device)
            if round_index == 1:
                decode_s.append(middle - begin)
                augment_s.append(time.perf_counter() - middle)
    stages_row = dict(
        batches=len(kept),
        decode_ms_per_batch=_median_ms(decode_s),
        augment_ms_per_batch=_median_ms(augment_s),
        decode_ms_per_image=round(_median_ms(decode_s) / batch, 5),
        augment_ms_per_image=round(_median_ms(augment_s) / batch, 5),
    )

    # 3. the training step fed by the bytes pipeline against synthetic batches
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def seconds_per_step(batches) -> float:
        for index, item in enumerate(batches):
            if index == WARMUP_STEPS:
                harness.synchronize(device)
                begin = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss, _, _ = model(item["imgs"], MASK_RATIO, item["noise"])
            loss.backward()
            optimizer.step()
        harness.synchronize(device)
        return (time.perf_counter() - begin) / steps

    total = WARMUP_STEPS + steps
    synthetic = data.SyntheticBatches(batch, 3, img_size, num_patches, total, 0, 0, device)
    synthetic_s = seconds_per_step(synthetic.iterate(0, 0))
    real = encoded_data.DecodedBatches(_encoded_loader(dataset, batch * total, batch, workers, device), decoder)
    real_s = seconds_per_step(real)
    step_row = dict(
        model=factory,
        img_size=img_size,
        steps=steps,
        synthetic_ms_per_step=round(synthetic_s * 1000, 3),
        real_jpeg_ms_per_step=round(real_s * 1000, 3),
        synthetic_img_per_s=round(batch / synthetic_s, 1),
        real_jpeg_img_per_s=round(batch / real_s, 1),
        real_vs_synthetic=round(real_s / synthetic_s, 4),
    )
    return dict(batch=batch, loader=loader_row, stages=stages_row, step=step_row)


def _device_main(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_data: --device cuda needs a visible CUDA device")
    batch = args.batch or (256 if device.type == "cuda" else 4)
    env = harness.environment(device, smoke=device.type != "cuda")
    env.update(cpu_model=cpu_model(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    if device.type != "cuda":
        env["note"] = "the device section on the CPU: a smoke run of the code, its numbers say nothing about a GPU"
    with tempfile.TemporaryDirectory() as root:
        write_photos(root)
        section = measure_device(root, device, batch, args.loader_batches, args.steps, args.workers, args.model)
    result = dict(environment=env, device_section=section)
    path = args.out / f"input_pipeline_{device.type}_{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    loader, stages, step = section["loader"], section["stages"], section["step"]
    print(f"loader alone, {loader['workers']} workers: {loader['img_per_s']} img/s "
          f"(first batch after {loader['first_batch_s']} s)")  # fmt: skip
    print(f"decode {stages['decode_ms_per_batch']} ms/batch, augment {stages['augment_ms_per_batch']} ms/batch "
          f"(batch {batch})")  # fmt: skip
    print(f"step {step['model']}: synthetic {step['synthetic_ms_per_step']} ms, "
          f"real JPEGs {step['real_jpeg_ms_per_step']} ms ({step['real_vs_synthetic']:.3f}x)")  # fmt: skip
    print(f"wrote {path}")
    return 0


@harness.restores_torch_threads
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per pipeline (default 7)")
    parser.add_argument("--batch", type=int, default=None, help="samples per round (default 56; device: 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: one worker's core)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="run the device section instead")
    parser.add_argument("--workers", type=int, default=16, help="device section: DataLoader workers (default 16)")
    parser.add_argument("--loader-batches", type=int, default=40, help="device section: batches the loader times")
    parser.add_argument("--steps", type=int, default=20, help="device section: timed training steps per feed")
    parser.add_argument("--model", choices=sorted(DEVICE_MODELS), default="vit_b", help="device section's MAE")
    args = parser.parse_args(argv)
    if args.device is not None:
        if (args.batch is not None and args.batch < 1) or args.loader_batches < 1 or args.steps < 1 or args.workers < 0:
            parser.error("--batch, --loader-batches and --steps must be >= 1 and --workers >= 0")
        return _device_main(args)
    args.batch = 56 if args.batch is None else args.batch
    if args.rounds < 1 or args.batch < 1 or args.threads < 1:
        parser.error("--rounds, --batch and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    import PIL
    import skimage
    import torchvision

    env = harness.environment(torch.device("cpu"), smoke=False)
    env.update(
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        threads=args.threads,
        torchvision=torchvision.__version__,
        pillow=PIL.__version__,
        scikit_image=skimage.__version__,
        load_average_before=list(os.getloadavg()),
        note="CPU numbers, one worker's work in one process; medians over interleaved rounds",
    )
    rows, sizes = measure(args.rounds, args.batch)
    env["load_average_after"] = list(os.getloadavg())
    result = dict(environment=env, rounds=args.rounds, batch=args.batch, images=sizes, rows=rows)
    path = args.out / f"data_cpu_{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    for row in rows:
        print(
            f"{row['pipeline']:<18} cpu {row['cpu_ms_per_image']:>8.4f} ms/img  wall {row['wall_ms_per_image']:>8.4f}"
            f" ms/img  {row['img_per_s_per_worker']:>8.1f} img/s/worker  x{row['wall_vs_pillow']:.3f} of Pillow"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
