"""The MAE training step on the CPU: mae_fast against transformers' ViTMAE and the release's model.

``python -m benchmarks.cpu_step [--sizes demo,vit_b] [--steps N] [--threads 2] [--compile] [--out DIR]``

Each provider runs forward + backward + AdamW on the same weights, images and mask noise, each with its own
library's training setup: mae_fast as ``mae-fast pretrain`` runs it (backend "auto", which is the "torch"
backend on CPU tensors; ``return_pred=False``, so the decoder's tail runs on the removed patches only; the
Linear GEMMs on the library mae_fast.cpu_gemm picks for this CPU; and its optimizer: torch's fused AdamW over
the release's two parameter groups), the peers with torch's default AdamW (foreach) over the same groups, as
the release's script and transformers' Trainer build it. Two more mae_fast rows take one thing away each, so
that each share of the difference shows: "mae_fast_default_adamw" has the peers' optimizer,
"mae_fast_torch_gemm" torch's own GEMM (MKL) for every product, as the peers have. The release's model
(benchmarks/reference_mae.py: timm-style blocks with F.scaled_dot_product_attention, a conv over every
patch, argsort masking) and transformers' ViTMAEForPreTraining with SDPA attention. Steps are interleaved
(one step of each provider in turn) so that a change in the machine's load hits all of them alike, in an
order that changes every round (``harness.balanced_rounds``): allocator and cache state carry over from one step
to the next, and with one fixed order mae_fast, measured first, came out ~2% faster against the peers than
with the order rotating. The median per provider is reported with its ratio to the fastest peer.
``--compile`` adds torch.compile of mae_fast's model and of the release's. These are CPU numbers, measured
on the machine named in the JSON's environment: they say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.reference_mae import ReferenceMAE
from mae_fast import cpu_gemm
from mae_fast.models import create_model
from mae_fast.train.schedule import build_optimizer, param_groups

#: The demo's model (`mae-fast pretrain --demo`: 28 px Fashion-MNIST, 4 px patches) and ViT-B/16, with batches.
SIZES = {
    "demo": dict(
        name="mae_vit_tiny_patch4_32",
        overrides=dict(
            img_size=28,
            patch_size=4,
            in_chans=1,
            embed_dim=64,
            depth=3,
            num_heads=4,
            decoder_embed_dim=32,
            decoder_depth=1,
            decoder_num_heads=4,
        ),
        batch=128,
    ),
    "vit_b": dict(name="mae_vit_base_patch16", overrides={}, batch=8),
}
PEERS = ("release", "transformers")


def _step(
    model: torch.nn.Module, forward: Callable[[], torch.Tensor], fused: bool, gemm: str | None = None
) -> Callable[[], tuple[float, float]]:
    """One timed training step; ``gemm`` forces mae_fast's Linear GEMMs onto "torch" or "onednn"."""
    if fused:
        optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    else:
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))

    def step() -> tuple[float, float]:
        """(seconds, loss) of one training step."""
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with cpu_gemm.using(gemm) if gemm else contextlib.nullcontext():
            loss = forward()
            loss.backward()
        optimizer.step()
        return time.perf_counter() - start, loss.item()

    return step


def providers(size: str, with_compile: bool, seed: int = 0) -> dict[str, Callable[[], tuple[float, float]]]:
    """One training step per provider, same initial weights, images and noise."""
    from mae_fast.interop import to_transformers

    spec = SIZES[size]
    torch.manual_seed(seed)
    model = create_model(spec["name"], **spec["overrides"])
    imgs = torch.randn(spec["batch"], model.in_chans, *model.img_size)
    noise = torch.rand(spec["batch"], model.num_patches)
    same = create_model(spec["name"], **spec["overrides"])  # mae_fast with the peers' optimizer
    same.load_state_dict(model.state_dict())
    torch_gemm = create_model(spec["name"], **spec["overrides"])  # mae_fast with the peers' GEMM
    torch_gemm.load_state_dict(model.state_dict())
    release = ReferenceMAE.like(model)
    transformers = to_transformers(model)
    transformers.config._attn_implementation = "sdpa"

    def mae_fast_loss(net):
        return lambda: net(imgs, 0.75, noise=noise, return_pred=False)[0]

    steps = {
        "mae_fast": _step(model, mae_fast_loss(model), fused=True),
        "mae_fast_default_adamw": _step(same, mae_fast_loss(same), fused=False),
        "mae_fast_torch_gemm": _step(torch_gemm, mae_fast_loss(torch_gemm), fused=True, gemm="torch"),
        "release": _step(release, lambda: release(imgs, 0.75, noise=noise)[0], fused=False),
        "transformers": _step(transformers, lambda: transformers(pixel_values=imgs, noise=noise).loss, fused=False),
    }
    if with_compile:
        fast = create_model(spec["name"], **spec["overrides"])
        fast.load_state_dict(model.state_dict())
        compiled = torch.compile(fast)
        steps["mae_fast_compiled"] = _step(fast, mae_fast_loss(compiled), fused=True)
        peer = ReferenceMAE.like(model)
        compiled_peer = torch.compile(peer)
        steps["release_compiled"] = _step(peer, lambda: compiled_peer(imgs, 0.75, noise=noise)[0], fused=False)
    return steps


def measure(size: str, steps: int, warmup: int, with_compile: bool) -> list[dict]:
    """Median step time per provider, interleaved; rows with the ratio to the fastest eager peer.

    The first step's losses (same weights, images and noise) must agree before anything is timed."""
    runs = providers(size, with_compile)
    first_loss = {name: run()[1] for name, run in runs.items()}
    expected = first_loss["release"]
    wrong = {name: loss for name, loss in first_loss.items() if abs(loss - expected) > 1e-4 * max(1.0, abs(expected))}
    if wrong:
        raise RuntimeError(f"{size}: the providers' first losses differ from the release's {expected}: {wrong}")
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runs}
    for order in harness.balanced_rounds(list(runs), steps):
        for name in order:
            times[name].append(runs[name]()[0])
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    best_peer = min(PEERS, key=medians.__getitem__)
    rows = []
    for name, median in medians.items():
        rows.append(
            dict(
                size=size,
                batch=SIZES[size]["batch"],
                provider=name,
                first_loss=first_loss[name],
                median_ms=round(median * 1e3, 2),
                samples_ms=[round(t * 1e3, 2) for t in times[name]],
                best_peer=best_peer,
                speedup_vs_best_peer=round(medians[best_peer] / median, 3),
            )
        )
    return rows


@harness.restores_torch_threads
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="demo,vit_b", help=f"comma list of {','.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per provider (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per provider first (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of mae_fast and of the release")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error(f"--sizes from {', '.join(SIZES)} (unknown: {unknown}); --steps, --threads >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    env = harness.environment(torch.device("cpu"), smoke=False)
    env.update(
        threads=args.threads,
        order="balanced Latin square",
        cpu_gemm=cpu_gemm.describe(),
        note="CPU numbers: nothing here is a GPU claim",
    )
    rows = []
    for size in sizes:
        rows += measure(size, args.steps, args.warmup, args.compile)
    path = args.out / f"cpu_step_{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    for row in rows:
        print(
            f"{row['size']:>6} batch {row['batch']:>3} {row['provider']:<18} {row['median_ms']:>9.1f} ms  "
            f"x{row['speedup_vs_best_peer']:.3f} vs {row['best_peer']}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
