"""setup.py's build decisions for the CUDA extension (run as a subprocess: it calls setup() on import)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup(env_overrides: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "MAE_FAST_BUILD_CUDA")}
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_skip_flag_skips_with_a_reason():
    result = _setup({"MAE_FAST_BUILD_CUDA": "0"})
    assert result.returncode == 0
    assert "skipping the CUDA extension: MAE_FAST_BUILD_CUDA=0" in result.stderr


def test_no_arch_and_no_gpu_skips_and_says_how_to_force():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible, so setup.py would build for it")
    result = _setup({})
    assert result.returncode == 0
    assert "skipping the CUDA extension" in result.stderr and "TORCH_CUDA_ARCH_LIST=9.0" in result.stderr


def test_forced_build_without_arch_fails_loudly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible, so setup.py would build for it")
    result = _setup({"MAE_FAST_BUILD_CUDA": "1"})
    assert result.returncode != 0
    assert "MAE_FAST_BUILD_CUDA=1" in result.stderr + result.stdout


def test_bad_flag_value_is_refused():
    result = _setup({"MAE_FAST_BUILD_CUDA": "yes"})
    assert result.returncode != 0 and "MAE_FAST_BUILD_CUDA must be 0, 1 or unset" in result.stderr + result.stdout


def test_kernels_are_installed_as_mae_fast_kernels():
    import mae_fast.kernels

    assert pathlib.Path(mae_fast.kernels.__file__).parent == ROOT / "kernels"
