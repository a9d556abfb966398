"""The command line: info runs, every subcommand is listed, only the selected one is imported, and a regular
install (no benchmarks/ next to mae_fast/) keeps every subcommand but bench working."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_fast import _extension, bench, cli, cpu_gemm, info

REPO = Path(__file__).resolve().parent.parent
OWN_OPTIONS = {
    "info": "show this help message",
    "bench": "--smoke",
    "pretrain": "--mask-ratio",
    "visualize": "--out",
    "eval": "--random-init",
    "finetune": "--layer-decay",
}


def test_info_reports_versions_extension_and_backends():
    text = info.report()
    for needle in ("torch", "triton", "extension", "patch_embed_gather", "visible_attention", "->"):
        assert needle in text
    assert "a ViT-B/16 MAE step in bf16 on cpu:\n  random_masking         -> torch x1" in text
    assert f"cpu gemm   fp32 Linear on CPU tensors: {cpu_gemm.cpu_gemm()} (MAE_FAST_CPU_GEMM=" in text


def test_info_shows_the_backend_of_every_op_of_a_model_step():
    """On fake tensors: every op of a ViT-B step resolves (encoder and decoder attention, 12 + 8 blocks)."""
    cpu = info.model_step_backends("cpu")
    assert cpu == {
        op: {"torch": calls}
        for op, calls in [
            ("random_masking", 1),
            ("patch_embed_gather", 1),
            ("qkv_attention", 20),
            ("unshuffle_mask_tokens", 1),
            ("masked_mse_loss", 1),
        ]
    }
    if torch.version.cuda is not None and _extension.available():
        assert {backend for backends in info.model_step_backends("cuda").values() for backend in backends} == {"cuda"}


def test_info_says_the_extension_is_not_built_when_the_install_has_none(monkeypatch):
    """A CPU install has no mae_fast._C; the reason must say so, not report a circular import."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "mae_fast._C" else real_find_spec(name, *args)
    )
    monkeypatch.setattr(_extension, "_state", _extension._State())
    monkeypatch.setattr(_extension, "_loaded", False)
    _extension.load()
    assert not _extension.available()
    assert "mae_fast._C is not built in this install" in _extension.unavailable_reason()
    assert "mae_fast._C is not built in this install" in info.report()


def test_python_dash_m_info():
    result = subprocess.run([sys.executable, "-m", "mae_fast", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "backends on" in result.stdout


def test_every_subcommand_is_listed_in_the_help_with_its_help_line(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    for name, (_, help_text) in cli.SUBCOMMANDS.items():
        assert name in out and help_text in out


@pytest.mark.parametrize("command", sorted(cli.SUBCOMMANDS))
def test_each_subcommand_help_shows_its_own_options(command, capsys):
    assert set(OWN_OPTIONS) == set(cli.SUBCOMMANDS)
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mae-fast {command}")
    assert OWN_OPTIONS[command] in out


def test_only_the_selected_subcommand_module_is_imported():
    """Fresh interpreters: `--help` imports no subcommand module, `info --help` only info's; `eval --help`
    imports eval (and what it imports itself), never bench or info."""
    probe = (
        "import sys\n"
        "from mae_fast import cli\n"
        "try:\n"
        "    cli.main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted(m for m, _ in cli.SUBCOMMANDS.values() if m in sys.modules)))\n"
    )

    def imported(*argv: str) -> set[str]:
        result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return set(result.stdout.splitlines()[-1].split()) if result.stdout.strip() else set()

    assert imported("--help") == set()
    assert imported("info", "--help") == {"mae_fast.info"}
    eval_imports = imported("eval", "--help")
    assert "mae_fast.train.eval" in eval_imports and not eval_imports & {"mae_fast.bench", "mae_fast.info"}


def test_an_unknown_or_missing_subcommand_is_a_usage_error(capsys):
    for argv in ([], ["no-such-verb"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bench_without_a_checkout_says_what_it_needs_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "CHECKOUT", tmp_path)
    for argv in (["bench"], ["bench", "--smoke"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2
        captured = capsys.readouterr()
        assert "needs a source checkout" in captured.err and "benchmarks/" in captured.err
        assert "pip install -e ." in captured.err and not captured.out
    assert bench.run(None) == 2  # run() on its own says the same
    assert "needs a source checkout" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # the other subcommands do not need it
        cli.main(["eval", "--help"])
    assert exited.value.code == 0


def test_a_regular_install_layout_runs_every_subcommand_but_bench(tmp_path):
    """The installed layout (mae_fast/ with kernels/ as mae_fast/kernels, no benchmarks/) copied outside the
    checkout and run from there: help works, bench exits 2 with its message, mae_fast comes from the copy.
    (scripts/check_install.sh does the same with a real pip install and the mae-fast console script.)"""
    site = tmp_path / "site"
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "mae_fast", site / "mae_fast", ignore=skip)
    shutil.copytree(REPO / "kernels", site / "mae_fast" / "kernels", ignore=skip, dirs_exist_ok=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}

    def python(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = python("-c", "import mae_fast.kernels, mae_fast; print(mae_fast.__file__, mae_fast.kernels.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(path.startswith(str(site)) for path in where.stdout.split()), where.stdout
    for command in ("pretrain", "eval"):
        result = python("-m", "mae_fast", command, "--help")
        assert result.returncode == 0 and f"usage: mae-fast {command}" in result.stdout, result.stderr
    result = python("-m", "mae_fast", "bench")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "needs a source checkout" in result.stderr and str(site) in result.stderr
