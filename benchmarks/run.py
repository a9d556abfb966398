"""Run the benchmark suite: ceilings, kernels vs peers, the training step, a batch sweep.

``python -m benchmarks.run [--smoke] [--out DIR] ...`` (also ``mae-fast bench``). Sections run in order
of importance (ViT-B kernels, ViT-B then ViT-L training step, the other models' kernels, the batch
sweep) so that a ``--budget-s`` cut keeps the headline numbers; everything not reached is recorded as
skipped. The JSON is rewritten after every case, so a run that is killed still leaves its results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

from benchmarks import bench_ops, bench_train, harness, plot, schema, summary
from benchmarks.options import BATCH, SMOKE_BATCH, SMOKE_SWEEP, SWEEP, add_arguments


def _finite(value):
    """JSON has no Infinity/NaN: such numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Results:
    """The results document, rewritten to disk after every case."""

    def __init__(self, path: Path, env: dict, ceilings: dict, config: dict, budget: harness.Budget):
        self.path, self.budget = path, budget
        self.doc = dict(
            schema_version=schema.SCHEMA_VERSION,
            environment=env,
            ceilings=ceilings,
            config=config,
            rows=[],
            elapsed_s=0.0,
        )

    def add(self, section: str, rows: list[dict]) -> None:
        for row in rows:
            row["section"] = section
        self.doc["rows"].extend(rows)
        self.save()

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.budget.elapsed(), 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_finite(self.doc), indent=1))
        tmp.replace(self.path)


def run(args: argparse.Namespace) -> int:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    smoke = args.smoke or device.type != "cuda"
    if smoke and not args.smoke:
        print("no CUDA GPU visible: running the --smoke suite on the CPU (its numbers are not claims)")
    shapes = bench_ops.SMOKE_SHAPES if smoke else bench_ops.MODEL_SHAPES
    train_models = bench_train.SMOKE_MODELS if smoke else bench_train.MODELS
    if not smoke:
        shapes = {k: v for k, v in shapes.items() if args.models is None or k in args.models}
        train_models = {k: v for k, v in train_models.items() if args.train_models is None or k in args.train_models}
    batch = args.batch or (SMOKE_BATCH if smoke else BATCH)
    sweep = args.sweep if args.sweep is not None else (SMOKE_SWEEP if smoke else SWEEP)
    steps = args.steps or (2 if smoke else 10)
    with_compile = not args.no_compile
    ops_filter = set(args.ops) if args.ops else None
    budget = harness.Budget(args.budget_s)

    env = harness.environment(device, smoke)
    stem = args.name or f"{harness.device_slug(env)}_{datetime.date.today().isoformat()}"
    if smoke and args.name is None:
        stem += "_smoke"
    print(f"measuring ceilings on {env['device']} ...", flush=True)
    ceilings = harness.measure_ceilings(device, smoke, args.rep_ms)
    config = dict(
        batch=batch,
        sweep=list(sweep),
        kernel_models=list(shapes),
        train_models=list(train_models),
        sections=list(args.sections),
        ops=sorted(ops_filter) if ops_filter else None,
        budget_s=args.budget_s,
        rep_ms=args.rep_ms,
        steps=steps,
        torch_compile_peers=with_compile and (not smoke or args.compile),
        rotation_bytes=harness.ROTATION_BYTES if device.type == "cuda" else None,
    )
    results = Results(args.out / f"{stem}.json", env, ceilings, config, budget)

    def kernels(models: dict, batch_size: int, section: str, compile_peers: bool, modes) -> None:
        cases = bench_ops.build_cases(
            models, batch_size, device, smoke, compile_peers, args.compile, ops_filter=ops_filter, modes=modes
        )
        for case in cases:
            if case.key in done[section]:
                continue
            done[section].add(case.key)
            if any(p.compiled for p in case.providers) and not budget.exhausted():
                torch._dynamo.reset()
            print(f"[{budget.elapsed():6.1f}s] {section}: {case.op} {case.label} {case.shape}", flush=True)
            try:
                rows = bench_ops.run_case(case, device, ceilings, budget, smoke, args.rep_ms)
            except Exception as error:  # a case that cannot even be set up is recorded; the others still run
                rows = bench_ops.failed_case_rows(case, error)
                _release(device)
            results.add(section, rows)

    def train(name: str) -> None:
        print(f"[{budget.elapsed():6.1f}s] train: {name} batch {batch}", flush=True)
        try:
            bench_train.run_model(
                name,
                train_models[name],
                batch,
                device,
                ceilings,
                budget,
                smoke,
                with_compile,
                args.compile,
                steps,
                emit=lambda row: results.add("train", [row]),
            )
        except Exception as error:  # e.g. out of memory in the float64 check: recorded, the suite goes on
            results.add("train", bench_train.failed_rows(name, batch, device, error))
            _release(device)
        results.save()  # the speedups were filled in after the rows were first written

    done: dict[str, set] = {"kernels": set(), "sweep": set()}
    first, rest = dict(list(shapes.items())[:1]), dict(list(shapes.items())[1:])
    if "kernels" in args.sections:
        kernels(first, batch, "kernels", with_compile, bench_ops.MODES)
    if "train" in args.sections and (ops_filter is None or "train_step" in ops_filter):
        for name in train_models:
            train(name)
    if "kernels" in args.sections and rest:
        kernels(rest, batch, "kernels", with_compile, bench_ops.MODES)
    if "sweep" in args.sections:
        for size in sweep:
            kernels(first, size, "sweep", False, ("fwd+bwd",))
    results.save()
    schema.validate(results.doc)
    written = [results.path]
    if not args.no_plots:
        written += plot.plot(results.doc, args.out, stem)
    text = summary.summarize(results.doc)
    summary_path = args.out / f"{stem}_summary.txt"
    summary_path.write_text(text + "\n")
    written.append(summary_path)
    print("\nwrote " + ", ".join(str(p) for p in written))
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
