"""The fine-tuning step: mae_fast's classifier against timm's VisionTransformer with the same weights.

``python -m benchmarks.finetune_step [--size vit_b|demo] [--batch N] [--steps N] [--threads 2] [--compile]``

Both run forward + backward + AdamW over the release's layer-decay groups on all tokens (197 at 224 px for
ViT-B/16) with drop path on (0.1), on the same images and labels: mae_fast's ``VisionTransformerClassifier``
(its patch embedding and fused attention; backend "auto") and timm's model (``F.scaled_dot_product_attention``)
loaded from it. Steps are interleaved so a change in the machine's load hits both; the median per provider
is printed, with its ratio to timm, and the peak CUDA memory on a GPU. ``--compile`` adds torch.compile of
timm's model. On the CPU these are CPU numbers and say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from mae_fast.models.classifier import create_classifier, to_timm_vit
from mae_fast.train.finetune import param_groups_layer_decay

SIZES = {
    "vit_b": dict(name="vit_base_patch16", kwargs=dict(img_size=224, in_chans=3, num_classes=1000), batch=2),
    "demo": dict(
        name="vit_tiny_patch4_32",
        kwargs=dict(img_size=28, in_chans=1, num_classes=10, embed_dim=64, depth=3, num_heads=4),
        batch=64,
    ),
}


def _optimizer(model):
    groups = param_groups_layer_decay(model, 0.05, 0.65, {"pos_embed", "cls_token"})
    for group in groups:
        group.pop("param_names")
    return torch.optim.AdamW(groups, lr=1e-4)


def _step(model, optimizer, imgs, labels, dtype):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(imgs.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(imgs), labels)
    loss.backward()
    optimizer.step()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="vit_b")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per provider (after 2 warmup steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="also torch.compile timm's model")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    size = SIZES[args.size]
    batch = args.batch or (size["batch"] if device.type == "cpu" else 64)
    torch.manual_seed(0)
    ours = create_classifier(size["name"], drop_path_rate=0.1, **size["kwargs"]).to(device)
    providers = {"mae_fast": ours, "timm": to_timm_vit(ours)}
    if args.compile:
        providers["timm_compiled"] = torch.compile(to_timm_vit(ours))
    optimizers = {name: _optimizer(model) for name, model in providers.items()}
    img = size["kwargs"]["img_size"]
    imgs = torch.randn(batch, size["kwargs"]["in_chans"], img, img, device=device)
    labels = torch.randint(0, size["kwargs"]["num_classes"], (batch,), device=device)
    times = {name: [] for name in providers}
    peak = {}
    for step in range(args.steps + 2):
        for name, model in providers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            _step(model, optimizers[name], imgs, labels, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak[name] = torch.cuda.max_memory_allocated() / 2**20
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    tokens = ours.num_patches + 1
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "size": args.size, "batch": batch, "tokens": tokens, "steps": args.steps,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "peak_mib": peak or None,
    }  # fmt: skip
    for name, seconds in report["median_s"].items():
        ratio = report["median_s"]["timm"] / seconds
        print(f"{name:14s} {seconds * 1e3:9.1f} ms/step  {ratio:5.2f}x timm  ({report['device']}, batch {batch}, "
              f"{tokens} tokens)")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
