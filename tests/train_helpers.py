"""Shared by the training tests: a tiny MAE config, short CPU runs and a tiny ImageFolder of random 16x16 images."""

import os

import numpy as np

from mae_fast.train import TrainConfig

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def make_image_folder(root, per_class=12, classes=2, size=16, seed=0):
    """root/<class>/<i>.png with random RGB images; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = os.path.join(root, f"class{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.png"))
    return str(root)


def quick_run_config(output_dir, **overrides) -> TrainConfig:
    """A CPU run of the TINY model on the built-in Fashion-MNIST subset (28x28, one channel), batch 16,
    with no worker processes, pictures or progress bars."""
    values = dict(
        model_kwargs=TINY,
        batch_size=16,
        output_dir=str(output_dir),
        num_workers=0,
        visualize=False,
        progress=False,
        device="cpu",
    )
    return TrainConfig(**{**values, **overrides})


def tiny_config(tmp_path, name="run", **overrides) -> TrainConfig:
    """24 images, global batch 8: 3 steps per epoch."""
    folder = tmp_path / "images"
    if not folder.exists():
        make_image_folder(folder)
    values = dict(
        data="imagefolder",
        data_path=str(folder),
        img_size=16,
        epochs=3,
        warmup_epochs=1.0,
        batch_size=8,
        blr=1e-2,
        log_every=1,
    )
    return quick_run_config(tmp_path / name, **{**values, **overrides})
