"""The command line: info and demo run, and report what they did."""

import subprocess
import sys

from mae_fast import cli, info


def test_info_reports_versions_extension_and_backends():
    text = info.report()
    for needle in ("torch", "triton", "extension", "patch_embed_gather", "visible_attention", "->"):
        assert needle in text


def test_python_dash_m_info():
    result = subprocess.run([sys.executable, "-m", "mae_fast", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "backends on" in result.stdout


def test_demo_runs_a_forward_backward(capsys):
    assert cli.main(["demo", "--steps", "1", "--batch-size", "2", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "step 0: loss" in out and "parameter tensors got gradients" in out
