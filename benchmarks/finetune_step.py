"""The fine-tuning step: mae_fast's classifier against timm's VisionTransformer with the same weights.

``python -m benchmarks.finetune_step [--size vit_b|demo] [--batch N] [--steps N] [--threads 2]
[--compile timm,mae_fast] [--out DIR]``

All run forward + backward + AdamW over the release's layer-decay groups on all tokens (197 at 224 px for
ViT-B/16) with drop path on (0.1), on the same images and labels: mae_fast's ``VisionTransformerClassifier``
(its patch embedding and fused attention; backend "auto"; on the CPU its Linear GEMMs on the library
mae_fast.cpu_gemm picks) and timm's model (``F.scaled_dot_product_attention``) loaded from it; on the CPU also
``mae_fast_torch_gemm``, mae_fast with torch's own GEMM (MKL) for every product, as timm has, so that the
GEMM library's share shows. ``--compile`` adds torch.compile of timm's model (``timm_compiled``: what a user after speed
would run instead of mae_fast) and / or of mae_fast's classifier (``mae_fast_compiled``: whether compiling
helps mae_fast's own kernels), each from the same weights. Every provider takes 2 warm-up steps first (their
time, compilation included, is ``warmup_s``); then the timed steps are interleaved so a change in the
machine's load hits all alike, in an order that changes every round (``harness.balanced_rounds``), and the
median per provider is printed with its ratio to eager timm.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over each provider's timed steps (reset before
each, the weights, gradients and AdamW state included). On the CPU it is not measured: torch's CPU allocator
keeps no peak statistic, tracemalloc does not see its allocations, and the process's peak RSS is one number
for all providers. On the CPU these are CPU numbers and say nothing about a GPU. A provider whose warm-up
fails (e.g. a compile error) is reported with the error and left out of the timing. The report (printed as
one JSON line, and written to ``DIR/finetune_step_<device>_<size>_<date>.json`` with ``--out``) carries the
command and the run's environment (versions, commit, threads).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from mae_fast import cpu_gemm
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


def _step(model, optimizer, imgs, labels, dtype, gemm=None):
    """One training step; ``gemm`` forces mae_fast's Linear GEMMs onto "torch" or "onednn"."""
    optimizer.zero_grad(set_to_none=True)
    with cpu_gemm.using(gemm) if gemm else contextlib.nullcontext():
        with torch.autocast(imgs.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(imgs), labels)
        loss.backward()
    optimizer.step()


COMPILABLE = ("timm", "mae_fast")
WARMUP_STEPS = 2


def _compile_choices(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in COMPILABLE]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--compile takes a comma list of {COMPILABLE}, got {text!r}")
    return names


@harness.restores_torch_threads
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="vit_b")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per provider (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--compile", type=_compile_choices, default=(), help="also torch.compile these: timm, mae_fast or both"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON into this folder")
    args = parser.parse_args(argv)
    if args.steps < 1 or (args.batch is not None and args.batch < 1) or (args.threads is not None and args.threads < 1):
        parser.error("--steps, --batch and --threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    size = SIZES[args.size]
    batch = args.batch or (size["batch"] if device.type == "cpu" else 64)
    torch.manual_seed(0)
    ours = create_classifier(size["name"], drop_path_rate=0.1, **size["kwargs"]).to(device)
    timm_model = to_timm_vit(ours)
    models = {"mae_fast": (ours, ours), "timm": (timm_model, timm_model)}  # name -> (module, what runs it)
    gemm = {}  # name -> the GEMM library forced on it
    if device.type == "cpu":
        torch_gemm = copy.deepcopy(ours)
        models["mae_fast_torch_gemm"], gemm["mae_fast_torch_gemm"] = (torch_gemm, torch_gemm), "torch"
    if "timm" in args.compile:
        timm_copy = to_timm_vit(ours)
        models["timm_compiled"] = (timm_copy, torch.compile(timm_copy))
    if "mae_fast" in args.compile:
        ours_copy = copy.deepcopy(ours)
        models["mae_fast_compiled"] = (ours_copy, torch.compile(ours_copy))
    img = size["kwargs"]["img_size"]
    imgs = torch.randn(batch, size["kwargs"]["in_chans"], img, img, device=device)
    labels = torch.randint(0, size["kwargs"]["num_classes"], (batch,), device=device)
    providers, warmup_s, failed = {}, {}, {}
    for name, (module, model) in models.items():  # warm-up (and compilation) one provider at a time
        optimizer = _optimizer(module)  # grouped by the module's own parameter names (no _orig_mod. prefix)
        begin = time.perf_counter()
        try:
            for _ in range(WARMUP_STEPS):
                _step(model, optimizer, imgs, labels, dtype, gemm.get(name))
            harness.synchronize(device)
        except Exception as error:  # noqa: BLE001 - reported, and the other providers still run
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            continue
        warmup_s[name] = time.perf_counter() - begin
        providers[name] = (model, optimizer)
    times = {name: [] for name in providers}
    peak = {name: 0.0 for name in providers} if device.type == "cuda" else None
    for order in harness.balanced_rounds(list(providers), args.steps):
        for name in order:
            model, optimizer = providers[name]
            harness.synchronize(device)
            if peak is not None:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            _step(model, optimizer, imgs, labels, dtype, gemm.get(name))
            harness.synchronize(device)
            times[name].append(time.perf_counter() - start)
            if peak is not None:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2**20)
    tokens = ours.num_patches + 1
    median = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "size": args.size, "batch": batch, "tokens": tokens, "steps": args.steps,
        "median_s": median,
        "vs_timm": {name: median["timm"] / seconds for name, seconds in median.items()} if "timm" in median else None,
        "warmup_s": warmup_s,
        "peak_mib": peak,
        "peak_memory": "torch.cuda.max_memory_allocated over the timed steps" if peak is not None
        else "unmeasured on the CPU (no peak statistic for torch's CPU allocator)",
        "failed": failed,
        "command": "python -m benchmarks.finetune_step " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": {
            **harness.environment(device, smoke=False),
            "threads": torch.get_num_threads(),
            "cpu_gemm": cpu_gemm.describe(),
        },
    }  # fmt: skip
    for name, seconds in median.items():
        ratio = f"{report['vs_timm'][name]:5.2f}x timm" if report["vs_timm"] else "timm failed"
        memory = f", peak {peak[name]:.0f} MiB" if peak is not None else ""
        print(f"{name:18s} {seconds * 1e3:9.1f} ms/step  {ratio}  (warm-up {warmup_s[name]:.1f} s{memory}; "
              f"{report['device']}, batch {batch}, {tokens} tokens)")  # fmt: skip
    for name, reason in failed.items():
        print(f"{name:18s} FAILED in warm-up: {reason}")
    print(json.dumps(report))
    if args.out is not None:
        slug = harness.device_slug(report["environment"])
        path = args.out / f"finetune_step_{slug}_{args.size}_{datetime.date.today().isoformat()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
