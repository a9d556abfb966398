"""The interpreter check of kernels/_config.py: triton < 3.8 with numpy >= 2.4 cannot run Triton's interpreter,
and a CPU test session on such a stack stops at once with that reason instead of failing test by test."""

import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import triton
from mae_fast.kernels import _config

TESTS = Path(__file__).absolute().parent


@pytest.mark.parametrize(
    "triton_version, numpy_version, refused",
    [
        ("3.6.0", "2.4.0", True),
        ("3.7.1", "2.5.5", True),
        ("3.6.0", "2.3.5", False),
        ("3.8.0", "2.4.0", False),
        ("3.9.0+git1234", "2.5.0rc1", False),
    ],
)
def test_reason_names_the_versions_and_the_fix(monkeypatch, triton_version, numpy_version, refused):
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reason = _config.interpreter_unusable_reason()
    if not refused:
        assert reason is None
        return
    assert triton_version in reason and numpy_version in reason
    assert "numpy<2.4" in reason and "GPU runs are unaffected" in reason


def test_cpu_session_on_such_a_stack_stops_before_collecting(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(
        "import numpy, triton\nnumpy.__version__ = '2.4.1'\ntriton.__version__ = '3.6.0'\n"
    )
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(TESTS / "test_readme.py")],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert output.count("needs numpy < 2.4") == 1, output
    assert "passed" not in output and "failed" not in output, output
