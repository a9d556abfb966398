"""How far mae_fast's resized_crop is from Pillow's bicubic resize (the release's RandomResizedCrop), on real photos.

The release augments with torchvision's RandomResizedCrop on PIL images (bicubic): Pillow crops the box and
resizes it with its antialiased bicubic in 8-bit fixed point, rounding to uint8 between its horizontal and
vertical passes. mae_fast's resized_crop computes the same filter (Keys' cubic, a = -0.5, support scaled by
the downscale factor) in float. This script draws RandomResizedCrop boxes (scale 0.2-1, ratio 3/4-4/3) on
scikit-image's bundled colour photos, resamples each box to ``--size`` both ways and prints the absolute
differences in uint8 levels: mae_fast's float result and its rounding against Pillow, and torchvision's
native uint8 CPU path (which rounds between passes, as Pillow does) against both, and the same filter
rounded and clipped to uint8 after its horizontal pass (Pillow's order) against Pillow.

    python -m benchmarks.resized_crop_vs_pillow [--crops 20] [--size 224]

Needs scikit-image (the photos) and Pillow (requirements-dev.txt).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import harness
from mae_fast import ops
from mae_fast.train.data import random_resized_crop_box

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def photos() -> dict[str, np.ndarray]:
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in PHOTOS}


def pillow_resized_crop(photo: np.ndarray, box, size: int) -> np.ndarray:
    from PIL import Image

    top, left, height, width = box
    crop = Image.fromarray(photo).crop((left, top, left + width, top + height))
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)


def torchvision_uint8(photo: np.ndarray, box, size: int) -> np.ndarray | None:
    """torchvision's tensor resized_crop on the uint8 image (torch's native uint8 kernel on AVX2 CPUs); None
    where that kernel fails."""
    from torchvision.transforms.v2 import functional

    image = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    try:
        out = functional.resized_crop(image, *box, [size, size], functional.InterpolationMode.BICUBIC, antialias=True)
    except RuntimeError:
        return None
    return out.permute(1, 2, 0).double().numpy()


def rounded_between_passes(photo: np.ndarray, box, size: int) -> np.ndarray:
    """The same filter (torch's, in float64), rounded and clipped to uint8 after the horizontal pass and at
    the end, as Pillow does: one F.interpolate per axis (the other axis keeps its size: identity weights)."""
    top, left, height, width = box
    crop = torch.from_numpy(photo[top : top + height, left : left + width]).permute(2, 0, 1)[None].double()
    horizontal = F.interpolate(crop, size=(height, size), mode="bicubic", antialias=True, align_corners=False)
    horizontal = horizontal.round().clamp(0, 255)
    both = F.interpolate(horizontal, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return both.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()


def measure(crops: int, size: int, seed: int = 0) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(seed)
    diffs: dict[str, list[np.ndarray]] = {
        "mae_fast (float) vs Pillow": [],
        "mae_fast rounded vs Pillow": [],
        "torchvision uint8 CPU vs Pillow": [],
        "torchvision uint8 CPU vs mae_fast (float)": [],
        "same filter, rounded between passes vs Pillow": [],
    }
    failures = 0
    for photo in photos().values():
        height, width = photo.shape[:2]
        boxes = [random_resized_crop_box(height, width, generator) for _ in range(crops)]
        image = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
        ours = ops.resized_crop([image] * crops, torch.tensor(boxes), size, dtype=torch.float64, backend="torch")
        ours = (ours * 255).permute(0, 2, 3, 1).numpy()
        for index, box in enumerate(boxes):
            pillow = pillow_resized_crop(photo, box, size)
            diffs["mae_fast (float) vs Pillow"].append(np.abs(ours[index] - pillow))
            diffs["mae_fast rounded vs Pillow"].append(np.abs(np.round(ours[index]) - pillow))
            diffs["same filter, rounded between passes vs Pillow"].append(
                np.abs(rounded_between_passes(photo, box, size) - pillow)
            )
            native = torchvision_uint8(photo, box, size)
            if native is None:
                failures += 1
                continue
            diffs["torchvision uint8 CPU vs Pillow"].append(np.abs(native - pillow))
            diffs["torchvision uint8 CPU vs mae_fast (float)"].append(np.abs(native - ours[index]))
    results = {}
    for name, values in diffs.items():
        flat = np.concatenate([v.ravel() for v in values])
        results[name] = {
            "mean": float(flat.mean()),
            "max": float(flat.max()),
            "over_1_level_pct": float(100 * (flat > 1.0).mean()),
            "crops": len(values),
        }
    results["torchvision uint8 CPU kernel failures"] = {"crops": failures}
    return results


@harness.restores_torch_threads
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=20, help="random boxes per photo (default 20)")
    parser.add_argument("--size", type=int, default=224, help="output side (default 224)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{len(PHOTOS)} photos ({', '.join(PHOTOS)}), {args.crops} RandomResizedCrop boxes each, to {args.size} px")
    for name, stats in measure(args.crops, args.size).items():
        if "mean" in stats:
            print(
                f"{name:46s} mean {stats['mean']:.3f}  max {stats['max']:.2f}  "
                f"> 1 level {stats['over_1_level_pct']:.3f}% of values ({stats['crops']} crops)"
            )
        else:
            print(f"{name:46s} {stats['crops']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
