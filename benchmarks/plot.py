"""PNG plots of a benchmark results file (matplotlib, Agg backend).

``python -m benchmarks.plot RESULTS.json [--out DIR]`` writes up to three figures next to the results
(or into DIR): ``<stem>_kernels.png`` (time per provider for every op at the headline shapes),
``<stem>_train.png`` (training-step img/s and MFU per provider) and ``<stem>_sweep.png`` (time against
batch size). Figures of a smoke run say in their title that their numbers are not claims.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAE_FAST_PROVIDERS = ("triton", "cuda", "mae_fast", "mae_fast_compiled")


def _title(doc: dict, what: str) -> str:
    env = doc["environment"]
    title = f"{what}: {env['device']}, {env['date'][:10]}, torch {env['torch']}"
    if not env["claims"]:
        title += "\nCPU smoke run: NOT performance claims"
    return title


def _color(provider: str) -> str:
    return "tab:red" if provider in MAE_FAST_PROVIDERS else "tab:blue"


def _headline_mode(rows: list[dict]) -> str:
    modes = {r["mode"] for r in rows}
    return "fwd+bwd" if "fwd+bwd" in modes else sorted(modes)[0]


def _panel_grid(count: int, panel_height: float):
    """A figure with ``count`` panels, at most 4 to a row; returns it and those panels (the rest are hidden)."""
    cols = min(4, count)
    nrows = math.ceil(count / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, panel_height * nrows + 0.8), squeeze=False)
    panels = list(axes.flat)
    for ax in panels[count:]:
        ax.axis("off")
    return fig, panels[:count]


def _save(fig, doc: dict, what: str, path: Path) -> None:
    fig.suptitle(_title(doc, what), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kernels(doc: dict, path: Path) -> bool:
    rows = [r for r in doc["rows"] if r["section"] == "kernels" and r["status"] == "ok"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["case"]), []).append(row)
    if not groups:
        return False
    fig, panels = _panel_grid(len(groups), 3.0)
    for ax, ((op, case), group) in zip(panels, sorted(groups.items()), strict=True):
        mode = _headline_mode(group)
        chosen = sorted((r for r in group if r["mode"] == mode), key=lambda r: r["median_ms"])
        names = [r["provider"] for r in chosen]
        times = [r["median_ms"] for r in chosen]
        errors = [[r["median_ms"] - r["p20_ms"] for r in chosen], [r["p80_ms"] - r["median_ms"] for r in chosen]]
        ax.barh(names, times, xerr=errors, color=[_color(n) for n in names])
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(f"{op}\n{case} {mode}", fontsize=9)
        ax.set_xlabel("median ms (p20-p80)", fontsize=8)
        ax.tick_params(labelsize=7)
    _save(fig, doc, "mae_fast kernels vs peers", path)
    return True


def plot_train(doc: dict, path: Path) -> bool:
    rows = [r for r in doc["rows"] if r["kind"] == "train_step" and r["status"] == "ok"]
    if not rows:
        return False
    models = sorted({r["case"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes.flat, models, strict=True):
        chosen = [r for r in rows if r["case"] == model]
        names = [r["provider"] for r in chosen]
        bars = ax.bar(names, [r["img_per_s"] for r in chosen], color=[_color(n) for n in names])
        for bar, row in zip(bars, chosen, strict=True):
            ax.annotate(
                f"MFU {row['pct_of_matmul']:.1f}%",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_title(f"{model}, batch {chosen[0]['shape']['B']}, {chosen[0]['dtype']}", fontsize=9)
        ax.set_ylabel("images / s")
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    _save(fig, doc, "MAE training step (fwd + bwd + AdamW)", path)
    return True


def plot_sweep(doc: dict, path: Path) -> bool:
    rows = [r for r in doc["rows"] if r["section"] in ("sweep", "kernels") and r["status"] == "ok"]
    swept = {(r["op"], r["case"]) for r in rows if r["section"] == "sweep"}
    if not swept:
        return False
    fig, panels = _panel_grid(len(swept), 3.2)
    for ax, (op, case) in zip(panels, sorted(swept), strict=True):
        group = [r for r in rows if r["op"] == op and r["case"] == case]
        mode = _headline_mode([r for r in group if r["section"] == "sweep"])
        for provider in sorted({r["provider"] for r in group}):
            points = sorted(
                (r["shape"]["B"], r["median_ms"]) for r in group if r["provider"] == provider and r["mode"] == mode
            )
            if len(points) > 1:
                ax.plot(
                    *zip(*points, strict=True),
                    marker="o",
                    label=provider,
                    linestyle="-" if provider in MAE_FAST_PROVIDERS else "--",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op}\n{case} {mode}", fontsize=9)
        ax.set_xlabel("batch", fontsize=8)
        ax.set_ylabel("median ms", fontsize=8)
        ax.legend(fontsize=6)
    _save(fig, doc, "batch sweep", path)
    return True


def plot(doc: dict, out_dir: Path, stem: str) -> list[Path]:
    """Write the figures that ``doc`` has data for; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("kernels", plot_kernels), ("train", plot_train), ("sweep", plot_sweep)):
        path = out_dir / f"{stem}_{name}.png"
        if draw(doc, path):
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results JSON written by the benchmarks")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: next to the JSON)")
    args = parser.parse_args(argv)
    from benchmarks import schema

    doc = json.loads(args.results.read_text())
    schema.validate(doc)
    for path in plot(doc, args.out or args.results.parent, args.results.stem):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
