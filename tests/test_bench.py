"""The benchmark suite (benchmarks/): its reference model, FLOP count, correctness gate, JSON schema,
plots, the CPU smoke run of ``mae-fast bench`` and the dry run of the GPU script."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tiny_models import tiny_mae  # noqa: E402

from benchmarks import bench_ops, harness, options, plot, run, schema, summary  # noqa: E402
from benchmarks.reference_mae import ReferenceMAE, model_train_flops_per_image  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bench_results_synthetic.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def _tiny(**overrides):
    """The suite's tiny MAE with a 32-wide, 4-head decoder."""
    return tiny_mae(decoder_embed_dim=32, decoder_num_heads=4, **overrides)


# --- the reference model of the end-to-end benchmark ------------------------------------------------------


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reference_mae_matches_mae_fast_loss_and_gradients(norm_pix):
    model = _tiny(norm_pix_loss=norm_pix).double()
    ref = ReferenceMAE.like(model).double()
    assert sorted(ref.state_dict()) == sorted(model.state_dict())
    imgs = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    noise = torch.rand(3, model.num_patches, dtype=torch.float64)
    loss, pred, mask = model(imgs, 0.75, noise)
    ref_loss, ref_pred, ref_mask = ref(imgs, 0.75, noise)
    assert torch.equal(mask, ref_mask.to(mask.dtype))
    torch.testing.assert_close(pred, ref_pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-8, atol=1e-10, msg=name)


def test_reference_mae_pos_tables_follow_the_spec():
    model = _tiny()
    fresh = ReferenceMAE(img_size=(16, 16), patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32)
    torch.testing.assert_close(fresh.pos_embed, model.pos_embed, rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh.decoder_pos_embed, model.decoder_pos_embed, rtol=0, atol=1e-6)


def test_train_flops_equal_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 16, 16)
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = model(imgs)
        loss.backward()
    assert counter.get_total_flops() == 2 * model_train_flops_per_image(model)


# --- harness ------------------------------------------------------------------------------------------


def test_compare_gate_accepts_the_reference_and_rejects_wrong_outputs():
    exact = torch.randn(64, dtype=torch.float64)
    eager = exact.to(torch.bfloat16)
    assert harness.compare(eager, exact, eager).ok
    wrong = eager.clone()
    wrong[3] += 0.5
    verdict = harness.compare(wrong, exact, eager)
    assert not verdict.ok and "output 0" in verdict.detail
    ids = torch.arange(5)
    assert harness.compare((eager, ids), (exact, ids), (eager, ids)).ok
    assert not harness.compare((eager, ids.flip(0)), (exact, ids), (eager, ids)).ok
    nan = eager.clone()
    nan[0] = float("nan")
    assert "non-finite" in harness.compare(nan, exact, eager).detail
    assert "missing" in harness.compare([None], [exact], [eager]).detail


def test_run_case_times_only_providers_that_pass_the_gate():
    device = torch.device("cpu")
    case = next(
        c
        for c in bench_ops.build_cases(bench_ops.SMOKE_SHAPES, 2, device, smoke=True, with_compile=False)
        if c.op == "unshuffle_mask_tokens"
    )

    def broken(*inputs):
        raise RuntimeError("kernel exploded\nsecond line")

    case.providers = [
        case.providers[0],
        bench_ops.Provider("wrong", lambda x, *rest: case.providers[0].fn(x, *rest) * 1.01),
        bench_ops.Provider("wrong_grad", lambda x, *rest: case.providers[0].fn(x.detach(), *rest) + 0 * x.sum()),
        bench_ops.Provider("broken", broken),
        bench_ops.Provider("refuses", broken, may_refuse=True),
        bench_ops.Provider("absent", broken, unavailable=lambda *inputs: "not built here"),
    ]
    ceilings = harness.measure_ceilings(device, smoke=True)
    rows = bench_ops.run_case(case, device, ceilings, harness.Budget(None), smoke=True)
    status = {(r["provider"], r["mode"]): (r["status"], r["reason"]) for r in rows}
    assert {status[("reference", m)][0] for m in bench_ops.MODES} == {"ok"}
    assert status[("wrong", "fwd")][0] == "mismatch" and "output 0" in status[("wrong", "fwd")][1]
    assert status[("wrong_grad", "bwd")][0] == "mismatch" and "output 1" in status[("wrong_grad", "bwd")][1]
    assert status[("broken", "fwd")] == ("error", "RuntimeError: kernel exploded")
    assert status[("refuses", "fwd")] == ("skipped", "RuntimeError: kernel exploded")
    assert status[("absent", "bwd")] == ("skipped", "not built here")
    assert all(r["median_ms"] is None for r in rows if r["provider"] != "reference")
    assert all(r["speedup"] == {} for r in rows)


@pytest.mark.parametrize(("batch", "seq"), [(256, 50), (7, 3), (1, 197)])
def test_varlen_lengths_keep_the_total_and_the_range(batch, seq):
    lengths = bench_ops.varlen_lengths(batch, seq, torch.Generator().manual_seed(0))
    assert len(lengths) == batch and sum(lengths) == batch * seq
    assert all(seq / 2 <= n <= 1.5 * seq for n in lengths)


def test_rotation_exceeds_twice_l2_on_gpus_only():
    cuda = torch.device("cuda")
    assert harness.rotation_count(10 * 1024**2, cuda) * 10 * 1024**2 >= 2 * harness.L2_BYTES
    assert harness.rotation_count(500 * 1024**2, cuda) == 1
    assert harness.rotation_count(1024, torch.device("cpu")) == 1


# --- schema, summary, plots -------------------------------------------------------------------------------


def test_schema_accepts_the_fixture():
    schema.validate(_fixture())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("environment"), "environment: missing"),
        (lambda d: d["rows"][0].pop("provider"), "missing 'provider'"),
        (lambda d: d["rows"][0].update(median_ms=None), "an ok row needs positive"),
        (lambda d: d["rows"][0].update(p20_ms=9.0), "p20_ms <= median_ms <= p80_ms"),
        (lambda d: d["rows"][0].update(status="done"), "'done' is not one of"),
        (lambda d: d["rows"][0].update(max_abs_err=None), "must record its correctness check"),
        (lambda d: d["rows"][0].update(gbps=-1.0), "non-negative number"),
        (lambda d: d["rows"][1].update(speedup={"triton": 1.0}), "compared with itself"),
        (lambda d: d["rows"][2].update(reason=None), "must give its reason"),
        (lambda d: d["rows"][2].update(median_ms=1.0), "must not carry timings"),
        (lambda d: d["environment"].update(smoke=True, claims=True), "cannot make performance claims"),
        (lambda d: d["ceilings"]["copy"].update(gbps=0), "ceilings.copy.gbps"),
        (lambda d: d.update(schema_version=0), "schema_version"),
    ],
)
def test_schema_rejects_malformed_results(mutate, message):
    doc = _fixture()
    mutate(doc)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        schema.validate(doc)


def test_targets_are_judged_only_when_both_sides_were_timed():
    verdicts = {target.what: (verdict, detail) for target, verdict, detail in summary.evaluate(_fixture())}
    assert verdicts["attention encoder fwd+bwd vs best SDPA"][0] == "met"  # 0.40 / 0.25 = 1.6 >= 1.5
    assert "1.60x" in verdicts["attention encoder fwd+bwd vs best SDPA"][1]
    assert verdicts["patchify+gather fwd vs PyTorch"][0] == "met"  # 0.12 / 0.03 = 4 >= 3
    assert verdicts["patchify+gather fwd, % of copy bandwidth"][0] == "NOT met"  # 44.7 < 85
    assert verdicts["train step ViT-B vs eager reference"][0] == "NOT met"  # 300 / 200 = 1.5 < 1.6
    assert verdicts["train step ViT-L vs eager reference"][0] == "not measured"
    assert verdicts["random masking vs argsort reference"][0] == "not measured"


def test_plots_from_the_fixture(tmp_path):
    written = plot.plot(_fixture(), tmp_path, "fixture")
    assert [p.name for p in written] == ["fixture_kernels.png", "fixture_train.png", "fixture_sweep.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


def test_plots_skip_figures_without_data(tmp_path):
    doc = _fixture()
    doc["rows"] = [r for r in doc["rows"] if r["section"] == "kernels"]
    assert [p.name for p in plot.plot(doc, tmp_path, "k")] == ["k_kernels.png"]


def test_summary_command_writes_text_and_plots(tmp_path, capsys):
    results = tmp_path / "fixture.json"
    results.write_text(FIXTURE.read_text())
    assert summary.main([str(results), "--plots"]) == 0
    text = (tmp_path / "fixture_summary.txt").read_text()
    assert "rows: 14 ok, 2 skipped, 1 mismatch, 0 error" in text
    assert "MISMATCH: visible_attention vit_b/encoder cuda fwd+bwd" in text
    assert text.strip() == capsys.readouterr().out.strip()
    assert len(list(tmp_path.glob("fixture_*.png"))) == 3


# --- the smoke run and the GPU script ---------------------------------------------------------------------


def test_smoke_run_checks_times_and_writes_valid_results(tmp_path):
    """mae-fast bench --smoke on the CPU: every op and the training step, gated and timed; nothing here is a claim."""
    from mae_fast import cli

    assert cli.main(["bench", "--smoke", "--out", str(tmp_path), "--name", "smoke", "--sweep", "4"]) == 0
    doc = json.loads((tmp_path / "smoke.json").read_text())
    schema.validate(doc)
    assert doc["environment"]["smoke"] and not doc["environment"]["claims"]
    rows = doc["rows"]
    assert {r["op"] for r in rows} == set(options.OPS)  # every op runs, and --ops knows them all
    assert {r["section"] for r in rows} == {"kernels", "train", "sweep"}
    ours = ("triton", "cuda", "mae_fast", "mae_fast_compiled")
    for row in rows:
        if row["provider"] in ("reference", "reference_eager", "release_conv_all_patches", "sdpa_math"):
            assert row["status"] == "ok", row
        if row["provider"] not in ours:  # the peers of this suite must never error
            assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "ok" and row["kind"] == "kernel":
            assert row["gbps"] > 0 and "not a GPU claim" in row["timer"]
    loss_rows = [r for r in rows if r["op"] == "masked_mse_loss" and r["section"] == "kernels"]
    assert {r["mode"] for r in loss_rows} == {"fwd", "bwd", "fwd+bwd"}
    # its Triton backward hands out the saved gradient, once per forward: "bwd" times a fresh one each call
    assert all(r["status"] == "ok" for r in loss_rows if r["provider"] == "triton"), loss_rows
    assert {r["mode"] for r in rows if r["section"] == "sweep"} == {"fwd", "fwd+bwd"}
    compiled = [r for r in rows if r["provider"].endswith("compiled")]
    assert compiled and all(r["status"] == "skipped" and "--smoke" in r["reason"] for r in compiled)
    timed = [r for r in rows if r["status"] == "ok" and r["op"] == "visible_attention" and r["mode"] == "fwd"]
    for row in timed:
        assert set(row["speedup"]) == {r["provider"] for r in timed} - {row["provider"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "smoke.json",
        "smoke_kernels.png",
        "smoke_summary.txt",
        "smoke_sweep.png",
        "smoke_train.png",
    ]
    assert "NOT performance claims" in (tmp_path / "smoke_summary.txt").read_text()


def test_budget_exhausted_records_every_case_as_skipped(tmp_path):
    args = ["--smoke", "--out", str(tmp_path), "--name", "b", "--budget-s", "0", "--no-plots", "--sweep", ""]
    assert run.main(args) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    schema.validate(doc)
    assert doc["rows"] and all(r["status"] == "skipped" and r["reason"] == "time budget exhausted" for r in doc["rows"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ops", "patchify,masked_mse_loss"], "unknown patchify"),
        (["--models", "vit_g"], "unknown vit_g"),
        (["--sections", "kernels,plots"], "unknown plots"),
        (["--batch", "0"], "expected a positive int"),
        (["--sweep", "32,x"], "expected a positive int"),
        (["--rep-ms", "-5"], "expected a positive int"),
        (["--budget-s", "-1"], "seconds >= 0"),
    ],
)
def test_bench_options_reject_bad_values(argv, message, capsys):
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert message in capsys.readouterr().err


def test_gpu_check_dry_run_writes_its_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir())
    stem = next(name for name in files if name.endswith(".json")).removesuffix(".json")
    assert stem.startswith("dry-run_")
    assert {"gpu_check.log", f"{stem}.json", f"{stem}_summary.txt", f"{stem}_kernels.png"} <= set(files)
    schema.validate(json.loads((out / f"{stem}.json").read_text()))
    tail = proc.stdout[proc.stdout.index("gpu_check: ") :]
    for stage in ("build", "tests-gpu", "tests-suite"):
        assert f"{stage}" in tail and "skipped (dry run)" in tail
    assert "preflight    ok" in tail and "report       ok" in tail
    assert "NOT performance claims" in tail
    assert "SKIPPED (dry run)" in (out / "gpu_check.log").read_text()


def test_gpu_check_usage_error():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.gpu
def test_gpu_smoke_run(tmp_path):
    """On a GPU: do_bench, CUDA events, input rotation and autocast on small shapes; no peer may fail."""
    args = ["--out", str(tmp_path), "--name", "g", "--models", "vit_b", "--train-models", "vit_b", "--batch", "8"]
    args += ["--ops", "patch_embed_gather,visible_attention,train_step", "--sweep", "", "--rep-ms", "5"]
    assert run.main(args + ["--steps", "2", "--no-compile", "--no-plots"]) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    schema.validate(doc)
    assert doc["environment"]["claims"] and doc["ceilings"]["copy"]["gbps"] > 100
    rows = doc["rows"]
    assert {r["op"] for r in rows} == {
        "patch_embed_gather",
        "visible_attention",
        "visible_attention_varlen",
        "train_step",
    }
    peers = [
        r for r in rows if r["provider"] in ("reference", "reference_eager", "release_conv_all_patches", "sdpa_math")
    ]
    assert peers and all(r["status"] == "ok" for r in peers)
    assert all("do_bench" in r["timer"] or "CUDA events" in r["timer"] for r in rows if r["status"] == "ok")
    train = [r for r in rows if r["kind"] == "train_step" and r["status"] == "ok"]
    assert train and all(r["peak_mem_gb"] > 0 and 0 < r["pct_of_matmul"] < 100 for r in train)


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6])
def test_interleaved_orders_balance_positions_and_predecessors(count):
    """Over one cycle every provider runs equally often in each position and right after each other one."""
    from collections import Counter

    from benchmarks.harness import balanced_rounds

    names = [f"p{i}" for i in range(count)]
    cycle = count if count % 2 == 0 else 2 * count
    rounds = balanced_rounds(names, 2 * cycle)
    assert all(sorted(order) == names for order in rounds)
    assert rounds[cycle:] == rounds[:cycle]
    positions = Counter((position, name) for order in rounds[:cycle] for position, name in enumerate(order))
    assert set(positions.values()) == {cycle // count} and len(positions) == count * count
    pairs = Counter((a, b) for order in rounds[:cycle] for a, b in zip(order, order[1:], strict=False))
    assert len(pairs) == count * (count - 1) and len(set(pairs.values())) == 1


def test_interleaved_orders_of_one_or_no_provider():
    from benchmarks.harness import balanced_rounds

    assert balanced_rounds(["only"], 3) == [["only"]] * 3
    assert balanced_rounds([], 2) == [[], []]


def test_cpu_step_benchmark_checks_losses_and_writes_ratios(tmp_path, monkeypatch):
    """benchmarks/cpu_step.py on a tiny size: every provider's first loss agrees, then rows with ratios."""
    from benchmarks import cpu_step

    tiny = dict(cpu_step.SIZES["demo"], batch=4)
    tiny["overrides"] = dict(tiny["overrides"], depth=1)
    monkeypatch.setitem(cpu_step.SIZES, "tiny", tiny)
    assert (
        cpu_step.main(["--sizes", "tiny", "--steps", "2", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
        == 0
    )
    (path,) = tmp_path.glob("cpu_step_*.json")
    document = json.loads(path.read_text())
    assert "GPU claim" in document["environment"]["note"]
    assert document["environment"]["cpu_gemm"].startswith(("onednn (", "torch ("))
    rows = {row["provider"]: row for row in document["rows"]}
    assert set(rows) == {"mae_fast", "mae_fast_default_adamw", "mae_fast_torch_gemm", "release", "transformers"}
    assert all(len(row["samples_ms"]) == 2 and row["median_ms"] > 0 for row in rows.values())
    best = rows[rows["mae_fast"]["best_peer"]]["median_ms"]
    assert rows["mae_fast"]["speedup_vs_best_peer"] == pytest.approx(best / rows["mae_fast"]["median_ms"], rel=0.01)
