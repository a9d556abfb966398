"""``mae-fast demo``: a few forward/backward steps of a small MAE on random images, with timings."""

from __future__ import annotations

import argparse
import time

import torch

from mae_fast.models import create_model, list_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mae_vit_tiny_patch4_32", choices=list_models())
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default=None, choices=["auto", "reference", "triton", "cuda"])


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(args.model, norm_pix_loss=True, backend=args.backend).to(device)
    imgs = torch.randn(args.batch_size, model.in_chans, *model.img_size, device=device)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.2f} M parameters, {model.num_patches} patches, on {device}")
    for step in range(args.steps):
        start = time.perf_counter()
        loss, pred, mask = model(imgs)
        loss.backward()
        elapsed = time.perf_counter() - start
        grads = sum(p.grad is not None for p in model.parameters())
        print(
            f"step {step}: loss {loss.item():.4f}, pred {tuple(pred.shape)}, {int(mask[0].sum())} of "
            f"{mask.shape[1]} patches masked, {grads} parameter tensors got gradients, {elapsed * 1e3:.0f} ms"
        )
        model.zero_grad(set_to_none=True)
    return 0
