"""A short text summary of a results file, and where each target of docs/performance.md stands.

Targets are ratios measured side by side in one run (H200, bf16 autocast, batch 256, 224 px). A target
is "met" or "NOT met" only when both sides were timed; otherwise it is "not measured", with the reason.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

MAE_FAST = ("cuda", "triton")
SDPA_FAST = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn")


@dataclass(frozen=True)
class Target:
    what: str
    op: str
    case: str
    mode: str
    metric: str  # "speedup" (over the best of peers), "pct_of_copy_bw", "mfu", "varlen_ratio"
    threshold: float
    peers: tuple[str, ...] = ()


def _train_step_targets(model: str, name: str) -> tuple[Target, ...]:
    """The training-step targets, the same for every model: speedups over both references, and MFU."""
    targets = []
    for reference, threshold in (("eager", 1.6), ("compiled", 1.25)):
        what = f"train step {name} vs {reference} reference"
        targets.append(Target(what, "train_step", model, "step", "speedup", threshold, (f"reference_{reference}",)))
    targets.append(Target(f"train step {name} MFU (%)", "train_step", model, "step", "mfu", 55.0))
    return tuple(targets)


TARGETS = (
    *_train_step_targets("vit_b", "ViT-B"),
    *_train_step_targets("vit_l", "ViT-L"),
    Target("patchify+gather fwd, % of copy bandwidth", "patchify_gather", "vit_b", "fwd", "pct_of_copy_bw", 85.0),
    Target("patchify+gather bwd, % of copy bandwidth", "patchify_gather", "vit_b", "bwd", "pct_of_copy_bw", 85.0),
    Target("patchify+gather fwd vs PyTorch", "patchify_gather", "vit_b", "fwd", "speedup", 3.0, ("reference",)),
    Target("patchify+gather bwd vs PyTorch", "patchify_gather", "vit_b", "bwd", "speedup", 3.0, ("reference",)),
    Target(
        "patch embed gather vs conv on all patches",
        "patch_embed_gather",
        "vit_b",
        "fwd+bwd",
        "speedup",
        2.5,
        ("release_conv_all_patches",),
    ),
    Target("masked loss fwd+bwd, % of copy bandwidth", "masked_mse_loss", "vit_b", "fwd+bwd", "pct_of_copy_bw", 80.0),
    Target("masked loss fwd+bwd vs eager", "masked_mse_loss", "vit_b", "fwd+bwd", "speedup", 4.0, ("reference",)),
    Target(
        "masked loss fwd+bwd vs compiled",
        "masked_mse_loss",
        "vit_b",
        "fwd+bwd",
        "speedup",
        1.5,
        ("reference_compiled",),
    ),
    Target(
        "unshuffle fwd+bwd, % of copy bandwidth", "unshuffle_mask_tokens", "vit_b", "fwd+bwd", "pct_of_copy_bw", 80.0
    ),
    Target(
        "attention encoder fwd+bwd vs best SDPA",
        "visible_attention",
        "vit_b/encoder",
        "fwd+bwd",
        "speedup",
        1.5,
        SDPA_FAST,
    ),
    Target(
        "attention decoder fwd+bwd vs best SDPA",
        "visible_attention",
        "vit_b/decoder",
        "fwd+bwd",
        "speedup",
        1.3,
        SDPA_FAST,
    ),
    Target(
        "varlen / fixed attention time (<=)",
        "visible_attention_varlen",
        "vit_b/encoder",
        "fwd+bwd",
        "varlen_ratio",
        1.1,
    ),
    Target("random masking vs argsort reference", "random_masking", "vit_b", "fwd", "speedup", 5.0, ("reference",)),
)


def _ok(rows, op, case, mode, section=("kernels", "train")):
    return [
        r
        for r in rows
        if r["op"] == op and r["case"] == case and r["mode"] == mode and r["status"] == "ok" and r["section"] in section
    ]


def _best(rows, providers):
    timed = [r for r in rows if r["provider"] in providers]
    return min(timed, key=lambda r: r["median_ms"]) if timed else None


def _timed(row) -> str:
    return f"{row['provider']} {row['median_ms']:.3f} ms"


def evaluate(doc: dict) -> list[tuple[Target, str, str]]:
    """(target, "met" / "NOT met" / "not measured", detail) for every target."""
    rows = doc["rows"]
    out = []
    for target in TARGETS:
        ours_names = ("mae_fast", "mae_fast_compiled") if target.op == "train_step" else MAE_FAST
        candidates = _ok(rows, target.op, target.case, target.mode)
        ours = _best(candidates, ours_names)
        if ours is None:
            out.append((target, "not measured", "no mae_fast provider was timed"))
            continue
        if target.metric == "speedup":
            peer = _best(candidates, target.peers)
            if peer is None:
                out.append((target, "not measured", f"no peer among {', '.join(target.peers)} was timed"))
                continue
            value = peer["median_ms"] / ours["median_ms"]
            detail = f"{value:.2f}x ({_timed(ours)} vs {_timed(peer)})"
        elif target.metric == "varlen_ratio":
            fixed = _best(_ok(rows, "visible_attention", target.case, target.mode), (ours["provider"],))
            if fixed is None:
                out.append((target, "not measured", f"fixed-length {ours['provider']} was not timed"))
                continue
            value = ours["median_ms"] / fixed["median_ms"]
            detail = f"{value:.2f} (varlen {_timed(ours)} vs fixed {_timed(fixed)})"
        else:
            key = "pct_of_matmul" if target.metric == "mfu" else target.metric
            value = ours.get(key)
            if value is None:
                out.append((target, "not measured", f"{key} missing"))
                continue
            detail = f"{value:.1f}% ({ours['provider']})"
        met = value <= target.threshold if target.metric == "varlen_ratio" else value >= target.threshold
        out.append((target, "met" if met else "NOT met", detail))
    return out


def summarize(doc: dict) -> str:
    env, ceilings, rows = doc["environment"], doc["ceilings"], doc["rows"]
    lines = [
        f"mae_fast benchmarks on {env['device']} ({env['date']}, commit {str(env.get('git_commit'))[:10]}, "
        f"torch {env['torch']}, triton {env.get('triton')})",
    ]
    if not env["claims"]:
        lines.append("not a GPU benchmark run: these numbers are NOT performance claims")
    lines.append(
        f"ceilings: copy {ceilings['copy']['gbps']:.1f} GB/s, {ceilings['matmul']['dtype']} matmul "
        f"{ceilings['matmul']['tflops']:.2f} TFLOP/s"
    )
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "mismatch", "error")}
    lines.append("rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for row in rows:
        if row["status"] in ("mismatch", "error"):
            lines.append(
                f"  {row['status'].upper()}: {row['op']} {row['case']} {row['provider']} {row['mode']}: {row['reason']}"
            )

    lines.append("")
    lines.append(
        f"{'op':<26}{'case':<15}{'mode':<8}{'provider':<20}{'median ms':>11} {'GB/s':>9} {'TFLOP/s':>9}  speedup"
    )
    for row in rows:
        if (
            row["status"] != "ok"
            or row["section"] == "sweep"
            or row["provider"]
            not in MAE_FAST
            + (
                "mae_fast",
                "mae_fast_compiled",
            )
        ):
            continue
        speedups = ", ".join(f"{v:.2f}x {k}" for k, v in sorted(row["speedup"].items()) if k not in MAE_FAST)
        gbps = f"{row['gbps']:.4g}" if row.get("gbps") else "-"
        tflops = f"{row['tflops']:.3g}" if row.get("tflops") else "-"
        lines.append(
            f"{row['op']:<26}{row['case']:<15}{row['mode']:<8}{row['provider']:<20}{row['median_ms']:>11.4f}"
            f" {gbps:>9} {tflops:>9}  {speedups}"
        )
    train = [r for r in rows if r["kind"] == "train_step" and r["status"] == "ok"]
    if train:
        lines.append("")
        lines.append(f"{'train step':<12}{'provider':<22}{'img/s':>10}{'ms':>10}{'MFU %':>8}{'peak GB':>9}")
        for row in train:
            peak = f"{row['peak_mem_gb']:.1f}" if row.get("peak_mem_gb") is not None else "-"
            lines.append(
                f"{row['case']:<12}{row['provider']:<22}{row['img_per_s']:>10.1f}{row['median_ms']:>10.2f}"
                f"{row['pct_of_matmul']:>8.1f}{peak:>9}"
            )
    lines.append("")
    if not env["claims"]:
        lines.append("targets (docs/performance.md): judged only on GPU runs")
        return "\n".join(lines)
    lines.append("targets (docs/performance.md):")
    for target, verdict, detail in evaluate(doc):
        lines.append(f"  [{verdict}] {target.what} (target {target.threshold:g}): {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.summary RESULTS.json [--out DIR] [--plots]``: validate, summarise, plot."""
    parser = argparse.ArgumentParser(description="Summary (and plots) of a benchmark results file.")
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for <stem>_summary.txt and the PNGs")
    parser.add_argument("--plots", action="store_true", help="also draw the PNGs")
    args = parser.parse_args(argv)
    from benchmarks import plot, schema

    doc = json.loads(args.results.read_text())
    schema.validate(doc)
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    if args.plots:
        plot.plot(doc, out, args.results.stem)
    text = summarize(doc)
    (out / f"{args.results.stem}_summary.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
