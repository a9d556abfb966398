"""Shared by the training tests: a tiny MAE config and a tiny ImageFolder of random 16x16 images."""

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


def tiny_config(tmp_path, name="run", **overrides) -> TrainConfig:
    """24 images, global batch 8: 3 steps per epoch."""
    folder = tmp_path / "images"
    if not folder.exists():
        make_image_folder(folder)
    values = dict(
        model="mae_vit_tiny_patch4_32",
        model_kwargs=TINY,
        data="imagefolder",
        data_path=str(folder),
        img_size=16,
        num_workers=0,
        epochs=3,
        warmup_epochs=1.0,
        batch_size=8,
        blr=1e-2,
        output_dir=str(tmp_path / name),
        log_every=1,
        visualize=False,
        progress=False,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)
