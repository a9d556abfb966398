"""Regenerate mae_fast/data/fashion_mnist_subset.npz from the original Fashion-MNIST IDX files.

The subset is deterministic: the first 1,000 training and the first 200 test images of each of the 10
classes, in file order. Source files: the four original ``*-ubyte.gz`` IDX files of Fashion-MNIST (MIT,
(c) 2017 Zalando SE), as Debian's ``dataset-fashion-mnist`` installs them in /usr/share/datasets/fashion-mnist
(see docs/toolchain.md, "Real data that can be had here").

    python scripts/make_fashion_mnist_subset.py [--source DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct

import numpy as np

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip) as a uint8 array: images [N, 28, 28] or labels [N]."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of each class, in file order."""
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]
    if any(len(p) < per_class for p in picked):
        raise ValueError(f"fewer than {per_class} samples in some class")
    return np.sort(np.concatenate(picked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "..", "mae_fast", "data", "fashion_mnist_subset.npz")
    )
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args()
    arrays = {}
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        images = read_idx(os.path.join(args.source, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(args.source, f"{prefix}-labels-idx1-ubyte.gz"))
        keep = first_per_class(labels, per_class)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[keep])
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[keep])
    arrays["classes"] = np.array(CLASSES)
    np.savez_compressed(args.out, **arrays)
    sizes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
    print(f"wrote {os.path.normpath(args.out)} ({os.path.getsize(args.out) / 1e6:.1f} MB): {sizes}")


if __name__ == "__main__":
    main()
