"""Shared by the training tests: a tiny MAE config, short CPU runs and a tiny ImageFolder of random 16x16 images."""

import os
import subprocess
import sys

import numpy as np
import torch

from mae_fast.train import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def make_split_image_folder(root, train_per_class: int, val_per_class: int, height: int, width: int) -> str:
    """root/{train,val}/{cat,dog}/<i>.png with random RGB images (a fine-tuning dataset); returns root."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return str(root)


def subprocess_env() -> dict[str, str]:
    """The environment for a ``python -m mae_fast`` subprocess: this checkout importable, no Triton interpreter,
    this process's CPU thread count (so that its runs are bit-comparable with this process's)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop("TRITON_INTERPRET", None)
    return env


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


def run_torchrun(cli_args: list[str], program: tuple[str, ...] = ("-m", "mae_fast")) -> subprocess.CompletedProcess:
    """``python PROGRAM CLI_ARGS`` (by default the mae_fast CLI) under torchrun with 2 CPU processes (one
    thread each, never the Triton interpreter)."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([*args, *program, *cli_args], capture_output=True, text=True, timeout=600, env=env)


def assert_same_weights(path_a, path_b, atol: float, key_bias_bound: float) -> None:
    """The ``model`` state dicts of two checkpoints or exports agree within ``atol``, except the key biases.

    The key bias gets an exactly-zero gradient (softmax ignores a per-query constant): what it receives is
    rounding noise, which AdamW normalises into steps of up to lr. So the q and v biases are compared, and k's
    must stay within ``key_bias_bound`` of its zero init in both runs."""
    a = torch.load(path_a, weights_only=True)["model"]
    b = torch.load(path_b, weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("attn.qkv.bias"):
            q_a, k_a, v_a = a[key].view(3, -1)
            q_b, k_b, v_b = b[key].view(3, -1)
            torch.testing.assert_close(torch.cat([q_b, v_b]), torch.cat([q_a, v_a]), atol=atol, rtol=0, msg=key)
            assert k_a.abs().max() <= key_bias_bound and k_b.abs().max() <= key_bias_bound
        else:
            torch.testing.assert_close(b[key], a[key], atol=atol, rtol=0, msg=key)
