"""The Triton random_masking (kernels/random_masking.py) against the stable-argsort reference.

On a machine without a GPU the kernel runs on CPU tensors through Triton's interpreter (conftest.py).
"""

import pytest
import torch
from mae_fast.kernels import random_masking as kernel
from triton_aot import compile_reports

from mae_fast import dispatch, ops, reference

NOISE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (batch, L, mask_ratio): MAE-B's 196 at 0.75, L not a multiple of BLOCK_L / BLOCK_M, several column
# blocks (L > BLOCK_M), batch 1, K = 1, K = L - 1, K = L
CASES = [(1, 196, 0.75), (3, 50, 0.5), (2, 300, 0.9), (2, 17, 0.9), (2, 33, 0.03), (1, 9, 0.0)]


def _poisoned_outputs(batch, length, len_keep, device):
    return (
        torch.full((batch, len_keep), -7, device=device, dtype=torch.int64),
        torch.full((batch, length), -7, device=device, dtype=torch.int64),
        torch.full((batch, length), float("nan"), device=device, dtype=torch.float32),
    )


def _run_poisoned(noise, len_keep):
    outputs = _poisoned_outputs(*noise.shape, len_keep, noise.device)
    kernel.random_masking_into(noise, len_keep, *outputs)
    return outputs


def _assert_same(outputs, expected):
    for name, got, want in zip(("ids_keep", "ids_restore", "mask"), outputs, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_L{}_r{}".format(*c))
@pytest.mark.parametrize("dtype", NOISE_DTYPES, ids=str)
def test_matches_stable_argsort(case, dtype, device):
    batch, length, ratio = case
    len_keep = reference.num_kept(length, ratio)
    noise = torch.rand(batch, length, device=device).to(dtype)  # low precision: many ties
    _assert_same(_run_poisoned(noise, len_keep), reference.random_masking(noise, len_keep))


@pytest.mark.parametrize("levels", [1, 3], ids=["all_equal", "three_values"])
def test_ties_go_to_the_lower_index(levels, device):
    noise = torch.randint(0, levels, (2, 150), device=device).float() / 4
    noise[1, ::2] = -0.0  # -0.0 and +0.0 tie
    len_keep = 40
    outputs = _run_poisoned(noise, len_keep)
    _assert_same(outputs, reference.random_masking(noise, len_keep))
    if levels == 1:
        assert torch.equal(outputs[1][0], torch.arange(150, device=device))


def test_nan_and_infinities_sort_as_torch_sort(device):
    """The kernel's rule (NaN above +inf, NaNs tie) equals torch's stable sort, which the reference uses."""
    noise = torch.rand(3, 70, device=device)
    noise[0, [3, 10, 11, 69]] = float("nan")
    noise[1, [0, 5]] = float("inf")
    noise[1, [6, 8]] = float("nan")
    noise[2, [2, 40]] = -float("inf")
    noise[2, :] = torch.where(noise[2] > 0.9, float("nan"), noise[2])
    _assert_same(_run_poisoned(noise, 68), reference.random_masking(noise, 68))


def test_public_op_rejects_nan_noise_on_the_cpu():
    noise = torch.rand(2, 16)
    noise[1, 3] = float("nan")
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match="noise must not contain NaN"):
            ops.random_masking(2, 16, 0.5, noise=noise, backend=backend)


def test_non_contiguous_noise(device):
    noise = torch.rand(61, 4, device=device).t()  # [4, 61] with stride (1, 4)
    _assert_same(ops.random_masking(4, 61, 0.75, noise=noise, backend="triton"), reference.random_masking(noise, 15))


def test_generator_draws_the_same_noise_as_the_reference(device):
    first = ops.random_masking(
        3, 49, 0.75, generator=torch.Generator(device).manual_seed(5), device=device, backend="triton"
    )
    second = ops.random_masking(
        3, 49, 0.75, generator=torch.Generator(device).manual_seed(5), device=device, backend="reference"
    )
    _assert_same(first, second)


def test_noise_requiring_grad(device):
    noise = torch.rand(2, 20, device=device, requires_grad=True)
    outputs = ops.random_masking(2, 20, 0.5, noise=noise, backend="triton")
    assert not any(out.requires_grad for out in outputs)
    _assert_same(outputs, reference.random_masking(noise.detach(), 10))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"noise": torch.rand(2, 15)}, ValueError, "noise must have shape"),
        ({"noise": torch.randint(0, 5, (2, 16))}, ValueError, "noise must have dtype"),
        ({"noise": torch.rand(16)}, ValueError, "noise must have 2 dimensions"),
        ({"mask_ratio": 1.0}, ValueError, "mask_ratio must be"),
        ({"mask_ratio": 0.97}, ValueError, "keeps no patch"),
        ({"noise": [[0.5] * 16] * 2}, TypeError, "noise must be a torch.Tensor"),
    ],
    ids=["shape", "dtype", "ndim", "ratio_range", "keeps_none", "not_tensor"],
)
def test_bad_input_is_a_clear_error(kwargs, error, message):
    arguments = {"batch_size": 2, "num_patches": 16, "mask_ratio": 0.5} | kwargs
    with pytest.raises(error, match=message):
        ops.random_masking(**arguments, backend="triton")


def test_triton_check_needs_a_usable_device():
    noise = torch.rand(2, 8, device="meta")
    assert "meta" in dispatch.explain("random_masking", noise, 4)["triton"]


def test_opcheck(device):
    noise = torch.rand(3, 45, device=device)
    torch.library.opcheck(torch.ops.mae_fast_triton.random_masking.default, (noise, 11))


def test_torch_compile_fullgraph(device):
    """The fake impl lets dynamo trace the primitive into one graph (backend="aot_eager" on the CPU).

    The primitive itself: the public op's dispatcher also runs the other backends' checks, whose tracing
    is not this kernel's concern (the GPU test below compiles the public op with inductor).
    """

    def masking(noise):
        ids_keep, ids_restore, mask = torch.ops.mae_fast_triton.random_masking(noise, 10)
        return ids_keep + 1, ids_restore, mask * 2

    noise = torch.rand(2, 40, device=device)
    torch._dynamo.reset()
    got = torch.compile(masking, fullgraph=True, backend="aot_eager")(noise)
    ids_keep, ids_restore, mask = reference.random_masking(noise, 10)
    _assert_same(got, (ids_keep + 1, ids_restore, mask * 2))


@pytest.mark.gpu
def test_torch_compile_inductor_public_op_gpu():
    def masking(noise):
        ids_keep, ids_restore, mask = ops.random_masking(8, 196, 0.75, noise=noise, backend="triton")
        return ids_keep + 1, ids_restore, mask * 2

    noise = torch.rand(8, 196, device="cuda")
    torch._dynamo.reset()
    got = torch.compile(masking, fullgraph=True)(noise)
    ids_keep, ids_restore, mask = reference.random_masking(noise, 49)
    _assert_same(got, (ids_keep + 1, ids_restore, mask * 2))


def test_aot_compiles_for_sm90_and_sm80_without_spills():
    jobs = []
    for arch in (90, 80):
        for noise_type, float64 in (("*fp32", False), ("*fp64", True)):
            signature = {"noise_ptr": noise_type, "ids_keep_ptr": "*i64", "ids_restore_ptr": "*i64"}
            signature |= {"mask_ptr": "*fp32", "length": "i32", "len_keep": "i32", "stride_nb": "i32"}
            signature |= dict.fromkeys(["stride_nl", "FLOAT64", "BLOCK_L", "BLOCK_M"], "constexpr")
            constexprs = {"stride_nl": 1, "FLOAT64": float64, "BLOCK_L": kernel.BLOCK_L, "BLOCK_M": kernel.BLOCK_M}
            jobs.append(
                {
                    "module": kernel.__name__,
                    "kernel": "_random_masking_kernel",
                    "signature": signature,
                    "constexprs": constexprs,
                    "arch": arch,
                    "label": noise_type,
                }
            )
    reports = compile_reports(jobs)
    for report in reports:
        print(f"noise {report['label']}: {report['text']}")
    assert all(report["spills"] == 0 for report in reports), [r["text"] for r in reports if r["spills"]]


@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "length"), [(256, 196), (4, 4096)])
def test_gpu_matches_reference_at_scale(batch, length):
    noise = torch.randint(0, 1000, (batch, length), device="cuda").float() / 1000  # many ties
    len_keep = reference.num_kept(length, 0.75)
    _assert_same(_run_poisoned(noise, len_keep), reference.random_masking(noise, len_keep))
