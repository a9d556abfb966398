"""The command line: info runs and lists every subcommand."""

import subprocess
import sys

import pytest

from mae_fast import cli, info


def test_info_reports_versions_extension_and_backends():
    text = info.report()
    for needle in ("torch", "triton", "extension", "patch_embed_gather", "visible_attention", "->"):
        assert needle in text


def test_python_dash_m_info():
    result = subprocess.run([sys.executable, "-m", "mae_fast", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "backends on" in result.stdout


def test_every_subcommand_is_listed_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out
