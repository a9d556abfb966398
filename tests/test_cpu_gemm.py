"""mae_fast.cpu_gemm and mae_fast.nn.Linear: F.linear, with fp32 CPU GEMMs on oneDNN where that is the faster.

The oneDNN path is forced on here (whatever this machine's CPU) and checked against float64 on fresh random
inputs of odd shapes, forward and the gradients of x, weight and bias; every input it does not take gives
F.linear's own result; the choice follows the CPU and MAE_FAST_CPU_GEMM; Linear is a drop-in nn.Linear.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from mae_fast import cpu_gemm, dispatch
from mae_fast.nn import Linear

ONEDNN_MISSING = cpu_gemm._onednn_unavailable_reason()
needs_onednn = pytest.mark.skipif(ONEDNN_MISSING is not None, reason=f"oneDNN path not testable: {ONEDNN_MISSING}")


@pytest.fixture
def onednn():
    """The oneDNN path on for the test, where this torch has it (the tests that need it are marked)."""
    with cpu_gemm.using("onednn" if ONEDNN_MISSING is None else "torch"):
        yield


def _fp32_tolerance(k: int) -> dict:
    return dict(atol=1e-5 * k**0.5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize(
    "lead, k, n",
    [((1,), 1, 1), ((7,), 13, 5), ((3, 5), 33, 17), ((2, 3, 4), 64, 96), ((197,), 768, 2304), ((), 9, 4)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_linear_matches_float64(onednn, lead, k, n, with_bias):
    x = torch.randn(*lead, k, requires_grad=True)
    weight = torch.randn(n, k, requires_grad=True)
    bias = torch.randn(n, requires_grad=True) if with_bias else None
    assert cpu_gemm.runs_on_onednn(x, weight, bias)
    out = cpu_gemm.linear(x, weight, bias)
    grad_out = torch.randn_like(out)
    inputs = [x, weight] + ([bias] if with_bias else [])
    grads = torch.autograd.grad(out, inputs, grad_out)

    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    expected = F.linear(exact[0], exact[1], exact[2] if with_bias else None)
    expected_grads = torch.autograd.grad(expected, exact, grad_out.double())
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, **_fp32_tolerance(k))
    reduced = {0: n, 1: x.numel() // k, 2: x.numel() // k}  # the length each gradient sums over
    for i, (grad, want) in enumerate(zip(grads, expected_grads, strict=True)):
        torch.testing.assert_close(grad.double(), want, **_fp32_tolerance(reduced[i]))


@needs_onednn
def test_onednn_linear_only_the_gradients_asked_for(onednn):
    x, weight, bias = torch.randn(6, 10), torch.randn(4, 10, requires_grad=True), torch.randn(4)
    out = cpu_gemm.linear(x, weight, bias)
    out.sum().backward()
    assert x.grad is None and bias.grad is None
    torch.testing.assert_close(weight.grad, torch.ones(6, 4).t() @ x, **_fp32_tolerance(6))


@needs_onednn
def test_onednn_linear_strided_inputs(onednn):
    x = torch.randn(12, 20)[::2, 3:14]  # non-contiguous [6, 11]
    weight = torch.randn(11, 9).t()  # [9, 11], transposed strides
    torch.testing.assert_close(cpu_gemm.linear(x, weight), x @ weight.t(), **_fp32_tolerance(11))


def _other_inputs():
    yield "float64", torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    yield "bfloat16", torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16)
    yield "empty", torch.randn(0, 8), torch.randn(5, 8)


@pytest.mark.parametrize("name, x, weight", list(_other_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_other_inputs_are_f_linear(onednn, name, x, weight):
    assert not cpu_gemm.runs_on_onednn(x, weight)
    torch.testing.assert_close(cpu_gemm.linear(x, weight), F.linear(x, weight), atol=0, rtol=0)


def test_autocast_is_f_linear(onednn):
    x, weight, bias = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_gemm.runs_on_onednn(x, weight, bias)
        out, expected = cpu_gemm.linear(x, weight, bias), F.linear(x, weight, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_fake_cuda_tensors_are_f_linear(onednn):
    with FakeTensorMode():
        x, weight = torch.empty(3, 8, device="cuda"), torch.empty(5, 8, device="cuda")
        assert not cpu_gemm.runs_on_onednn(x, weight)
        assert cpu_gemm.linear(x, weight).shape == (3, 5)


def test_shape_mismatch_is_f_linears_error(onednn):
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cpu_gemm.linear(torch.randn(3, 8), torch.randn(5, 7))


@pytest.mark.parametrize(
    "requested, vendor, flags, unavailable, expected",
    [
        ("auto", "AuthenticAMD", {"avx2", "avx512f"}, None, "onednn"),
        ("auto", "AuthenticAMD", {"avx2"}, None, "torch"),
        ("auto", "GenuineIntel", {"avx2", "avx512f"}, None, "torch"),
        ("auto", "AuthenticAMD", {"avx512f"}, "no oneDNN", "torch"),
        ("torch", "AuthenticAMD", {"avx512f"}, None, "torch"),
        ("onednn", "GenuineIntel", set(), None, "onednn"),
        ("auto", "", set(), None, "torch"),
    ],
)
def test_choice_follows_the_cpu_and_the_environment(requested, vendor, flags, unavailable, expected):
    assert cpu_gemm.choose(requested, vendor, flags, unavailable) == expected


def test_bad_choices_say_what_is_wrong():
    with pytest.raises(ValueError, match="MAE_FAST_CPU_GEMM='mkl': expected one of auto, onednn, torch"):
        cpu_gemm.choose("mkl", "AuthenticAMD", set(), None)
    with pytest.raises(RuntimeError, match="MAE_FAST_CPU_GEMM=onednn, but no oneDNN here"):
        cpu_gemm.choose("onednn", "AuthenticAMD", set(), "no oneDNN here")


def test_using_sets_the_choice_inside_only():
    outside = cpu_gemm.cpu_gemm()
    with cpu_gemm.using("torch"):
        assert cpu_gemm.cpu_gemm() == "torch"
        assert not cpu_gemm.runs_on_onednn(torch.randn(2, 3), torch.randn(4, 3))
    assert cpu_gemm.cpu_gemm() == outside
    with pytest.raises(ValueError, match="choice must be 'onednn' or 'torch', got 'auto'"):
        with cpu_gemm.using("auto"):
            pass


def test_this_machines_cpu_flags_are_read():
    vendor, flags = cpu_gemm._cpu_flags()
    assert cpu_gemm.cpu_gemm() in ("onednn", "torch")
    if vendor:  # Linux: /proc/cpuinfo names a vendor and its flags
        assert flags


@needs_onednn
def test_linear_is_a_drop_in_nn_linear(onednn):
    plain = nn.Linear(11, 7)
    ours = Linear(11, 7)
    assert isinstance(ours, nn.Linear)
    ours.load_state_dict(plain.state_dict())
    assert ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 11)
    assert cpu_gemm.runs_on_onednn(x, ours.weight, ours.bias)
    torch.testing.assert_close(ours(x), plain(x), **_fp32_tolerance(11))


def test_reference_backend_linear_is_f_linear(onednn, monkeypatch):
    def refuse(*args):
        raise AssertionError("the reference Linear took mae_fast.cpu_gemm")

    monkeypatch.setattr(cpu_gemm, "linear", refuse)
    layer, x = Linear(6, 4, backend="reference"), torch.randn(5, 6)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)
    layer.backend = None
    with dispatch.use_backend("reference"):
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)


def test_linear_rejects_unknown_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        Linear(3, 4, backend="mkl")
