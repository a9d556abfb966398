"""Pictures of what the MAE learned, and ``mae-fast visualize CHECKPOINT IMAGES...``.

The grid has one row per image and four columns: the original, the masked input (removed patches grey),
the reconstruction, and the reconstruction with the visible patches pasted back. With norm_pix_loss the
model predicts each patch normalised by its own mean and (unbiased) variance, so the prediction is
mapped back with the true patch's statistics before it is drawn. Drawn with matplotlib's Agg canvas
(no pyplot, no display needed).
"""

from __future__ import annotations

import argparse
import os

import torch

from mae_fast.train.runmodel import model_from_checkpoint, normalisation

DEFAULT_OUT = "reconstruction.png"
COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


def reconstruct(model, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> dict[str, torch.Tensor]:
    """Run ``model`` on normalised ``imgs`` [B, C, H, W] with mask ``noise`` [B, L].

    Returns normalised-space images [B, C, H, W] (float32): ``original``, ``masked`` (removed patches
    NaN, drawn grey), ``reconstruction`` and ``pasted`` (visible patches from the original), and
    ``mask`` [B, L] (1 = removed).
    """
    model.eval()
    with torch.no_grad():
        _, pred, mask = model(imgs, mask_ratio, noise)
        pred = pred.float()
        if model.norm_pix_loss:
            target = model.patchify(imgs).float()
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        recon = model.unpatchify(pred)
        pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).to(pred.dtype))
    original = imgs.float()
    return {
        "original": original,
        "masked": original.masked_fill(pixel_mask.bool(), float("nan")),
        "reconstruction": recon,
        "pasted": torch.where(pixel_mask.bool(), recon, original),
        "mask": mask,
    }


def _to_display(img: torch.Tensor, mean, std) -> torch.Tensor:
    """[C, H, W] normalised -> [H, W, C] in [0, 1]; NaN (removed patches) becomes mid-grey."""
    mean_t = torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=img.dtype).view(-1, 1, 1)
    pixels = (img * std_t + mean_t).clamp(0.0, 1.0)
    return torch.nan_to_num(pixels, nan=0.5).permute(1, 2, 0)


def save_reconstruction_grid(model, imgs, noise, mean, std, mask_ratio: float, path: str) -> str:
    """Write the four-column grid of :func:`reconstruct` for ``imgs`` to ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = reconstruct(model, imgs, noise, mask_ratio)
    rows = imgs.shape[0]
    figure = Figure(figsize=(4 * 1.6, rows * 1.6 + 0.3))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 4, squeeze=False)
    for r in range(rows):
        for c, key in enumerate(("original", "masked", "reconstruction", "pasted")):
            picture = _to_display(out[key][r], mean, std).numpy()
            ax = axes[r][c]
            if picture.shape[-1] == 1:
                ax.imshow(picture[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def save_loss_curve(history: list[tuple[int, float]], path: str) -> str:
    """Loss against optimizer step (log-scaled loss axis when it spans a decade) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [s for s, _ in history]
    losses = [loss for _, loss in history]
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (masked patches)")
    ax.set_title("MAE pretraining loss")
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def load_image(path: str, in_chans: int, img_size: int, mean, std) -> torch.Tensor:
    """An image file -> normalised float32 [C, S, S]: shorter side resized to S (bicubic), centre crop.

    Read as training reads it (:func:`mae_fast.train.data.decode_image_file`): regular files only, 16-bit and
    float images scaled to 8 bits, decompression bombs refused."""
    import numpy as np
    from PIL import Image

    from mae_fast.train.data import UnreadableImage, decode_image_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        rgb = decode_image_file(path)
    except UnreadableImage as error:
        raise ValueError(f"cannot read image {error.record.path}: {error.record.reason}") from error
    image = Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L" if in_chans == 1 else "RGB")
    width, height = image.size
    scale = img_size / min(width, height)
    size = (max(img_size, round(width * scale)), max(img_size, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - img_size) // 2, (size[1] - img_size) // 2
    array = np.asarray(image.crop((left, top, left + img_size, top + img_size)), dtype=np.float32)
    tensor = torch.from_numpy(array.copy()).div_(255.0)
    tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return (tensor - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def output_path(out: str) -> str:
    """The file ``--out`` names: inside it when it is a folder, with ".png" added when it has no suffix."""
    if not out.strip():
        raise SystemExit("--out must not be empty")
    if os.path.isdir(out):
        return os.path.join(out, DEFAULT_OUT)
    return out if os.path.splitext(out)[1] else f"{out}.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a training checkpoint or an export (mae_pretrain.pth) of mae-fast pretrain")
    parser.add_argument("images", nargs="+", help="image files (any size; resized and centre-cropped)")
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="PNG to write, '.png' added when it has no suffix; a folder: DIR/%(default)s"
    )
    parser.add_argument("--mask-ratio", type=float, default=None, help="default: the run's mask ratio")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask noise")


def run(args: argparse.Namespace) -> int:
    out = output_path(args.out)
    try:
        model, config = model_from_checkpoint(args.checkpoint)
        mean, std = normalisation(config)
        imgs = torch.stack([load_image(p, model.in_chans, model.img_size[0], mean, std) for p in args.images])
    except (FileNotFoundError, ValueError) as error:  # a checkpoint or image that is missing or unreadable
        raise SystemExit(f"mae-fast visualize: {error}") from error
    mask_ratio = config.mask_ratio if args.mask_ratio is None else args.mask_ratio
    if not 0.0 < mask_ratio < 1.0:
        raise SystemExit(f"--mask-ratio must be in (0, 1), got {mask_ratio}")
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=torch.Generator().manual_seed(args.seed))
    try:
        path = save_reconstruction_grid(model, imgs, noise, mean, std, mask_ratio, out)
    except ValueError as error:  # the model's own check: a ratio that keeps every patch of this grid, or none
        raise SystemExit(f"mae-fast visualize: --mask-ratio: {error}") from error
    print(f"wrote {path}: {len(args.images)} images, mask ratio {mask_ratio}")
    return 0
