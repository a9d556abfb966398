"""benchmarks/finetune_step.py: the providers side by side, the compiled variants' wiring, a failing provider."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import finetune_step  # noqa: E402


def _report(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eager_providers_side_by_side(capsys):
    assert finetune_step.main(["--size", "demo", "--batch", "2", "--steps", "2", "--threads", "1"]) == 0
    report = _report(capsys)
    eager = {"mae_fast", "mae_fast_torch_gemm", "timm"}
    assert set(report["median_s"]) == eager and all(s > 0 for s in report["median_s"].values())
    assert report["vs_timm"]["timm"] == 1.0 and report["tokens"] == 50 and report["failed"] == {}
    assert report["peak_mib"] is None and "unmeasured on the CPU" in report["peak_memory"]
    assert set(report["warmup_s"]) == eager


def test_the_report_carries_its_environment_and_goes_to_out(capsys, tmp_path):
    argv = ["--size", "demo", "--batch", "2", "--steps", "1", "--threads", "1", "--out", str(tmp_path)]
    assert finetune_step.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    (path,) = tmp_path.glob("finetune_step_cpu_demo_*.json")
    printed = json.loads(lines[-2])
    assert lines[-1] == f"wrote {path}"
    written = json.loads(path.read_text())
    assert written == printed and written["command"].endswith("--out " + str(tmp_path))
    environment = written["environment"]
    assert environment["threads"] == 1 and environment["torch"] == torch.__version__ and not environment["claims"]
    assert environment["cpu_gemm"].startswith(("onednn (", "torch ("))


def test_compiled_variants_run_the_compiled_callable_and_a_failing_one_is_reported(capsys, monkeypatch):
    compiled = []

    def fake_compile(module):  # stands in for torch.compile: records the module, runs it
        compiled.append(module)
        return lambda imgs: module(imgs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    argv = ["--size", "demo", "--batch", "2", "--steps", "1", "--threads", "1", "--compile", "timm,mae_fast"]
    assert finetune_step.main(argv) == 0
    report = _report(capsys)
    assert set(report["median_s"]) == {"mae_fast", "mae_fast_torch_gemm", "timm", "timm_compiled", "mae_fast_compiled"}
    assert [type(m).__name__ for m in compiled] == ["VisionTransformer", "VisionTransformerClassifier"]

    def broken_compile(module):
        def run(imgs):
            raise RuntimeError("backend compiler failed\nlong traceback")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    assert finetune_step.main(argv[:-1] + ["timm"]) == 1
    report = _report(capsys)
    assert report["failed"] == {"timm_compiled": "RuntimeError: backend compiler failed"}
    assert set(report["median_s"]) == {"mae_fast", "mae_fast_torch_gemm", "timm"}


@pytest.mark.parametrize("argv", [["--compile", "inductor"], ["--compile", ","], ["--steps", "0"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        finetune_step.main(["--size", "demo", *argv])
    assert "--" in capsys.readouterr().err
