"""The input pipeline on the CPU: the release's Pillow pipeline against mae_fast's bytes pipeline, per image.

``python -m benchmarks.bench_data [--rounds 7] [--batch 56] [--threads 1] [--out benchmarks/results]``

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

Rounds are interleaved (one round of each pipeline in turn) so that load from other processes on a shared
machine hits all three alike; the medians over rounds are reported. ``cpu_ms_per_image`` is the process's
CPU time per image, ``wall_ms_per_image`` its wall time and ``img_per_s_per_worker`` 1000 / wall ms.
These are CPU numbers, measured on the machine named in the JSON's environment.
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

from benchmarks import harness

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
        for _ in range(rounds):
            for name, run in pipelines.items():
                samples[name].append(_timed(run))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per pipeline (default 7)")
    parser.add_argument("--batch", type=int, default=56, help="samples per round (default 56)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: one worker's core)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    args = parser.parse_args(argv)
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
