"""random_masking on every backend, and its primitive on every namespace, against the stable-argsort reference.

Every result must equal the reference exactly: ties go to the lower patch index, -0.0 ties +0.0, NaN sorts
above +inf (torch's sort) where the public op cannot reject it without a device sync.
"""

from __future__ import annotations

import pytest
import torch
from cases import FLOAT_DTYPES, check_aot_builds, register_aot_jobs
from mae_fast.kernels import random_masking as kernel

from mae_fast import dispatch, ops, reference

# L = 1 to 1024 (the CUDA kernel's row in shared memory): not multiples of the Triton blocks (16, 128), one
# to several column blocks, MAE-B's 196 and 256 (a 16 x 16 grid)
LENGTHS = [1, 4, 9, 17, 33, 49, 50, 196, 256, 300, 1000, 1024]
# (batch, L, mask_ratio): MAE-B's 196 at 0.75, L not a multiple of BLOCK_L / BLOCK_M, several column
# blocks (L > BLOCK_M), batch 1, K = 1, K = L - 1, K = L
CASES = [(1, 196, 0.75), (3, 50, 0.5), (2, 300, 0.9), (2, 17, 0.9), (2, 33, 0.03), (1, 9, 0.0)]


def assert_same(outputs, expected):
    for name, got, want in zip(("ids_keep", "ids_restore", "mask"), outputs, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name


def tricky_noise(length, dtype, device):
    """Five rows: ties (half of row 0), -0.0 and 0.0 among draws, NaN and +inf (row 3), plain draws."""
    noise = torch.rand(5, length, device=device).to(dtype)
    noise[0, : length // 2] = 0.5  # ties go to the lower index
    noise[1, ::3] = -0.0
    noise[2, ::2] = 0.0
    if length > 2:
        noise[3, 1] = float("nan")
        noise[3, 2] = float("inf")
    return noise


def kept_counts(length):
    """K = 1, L / 4, L and what mask ratios 0.75 and 0.9 keep (at least 1)."""
    counts = {1, max(1, length // 4), length}
    counts |= {k for k in (reference.num_kept(length, 0.75), reference.num_kept(length, 0.9)) if k >= 1}
    return sorted(counts)


# --- the public op, on every backend ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_L{}_r{}".format(*c))
def test_random_masking_matches_the_reference(backend, case):
    batch, length, ratio = case
    noise = torch.rand(batch, length, device=backend.device)
    expected = reference.random_masking(noise, reference.num_kept(length, ratio))
    assert_same(ops.random_masking(batch, length, ratio, noise=noise, backend=backend.name), expected)


def test_public_op_rejects_nan_noise(backend, monkeypatch):
    """Checked on the host: on CPU tensors, and on a GPU with MAE_FAST_CHECK_INDICES=1."""
    monkeypatch.setenv("MAE_FAST_CHECK_INDICES", "1")
    noise = torch.rand(2, 16, device=backend.device)
    noise[1, 3] = float("nan")
    with pytest.raises(ValueError, match="noise must not contain NaN"):
        ops.random_masking(2, 16, 0.5, noise=noise, backend=backend.name)


def test_non_contiguous_noise(backend):
    noise = torch.rand(61, 4, device=backend.device).t()  # [4, 61] with stride (1, 4)
    outputs = ops.random_masking(4, 61, 0.75, noise=noise, backend=backend.name)
    assert_same(outputs, reference.random_masking(noise, 15))


@pytest.mark.backends("triton", "cuda")
def test_generator_draws_the_same_noise_as_the_reference(backend):
    device = backend.device
    first = ops.random_masking(
        3, 49, 0.75, generator=torch.Generator(device).manual_seed(5), device=device, backend=backend.name
    )
    second = ops.random_masking(
        3, 49, 0.75, generator=torch.Generator(device).manual_seed(5), device=device, backend="reference"
    )
    assert_same(first, second)


def test_noise_requiring_grad(backend):
    noise = torch.rand(2, 20, device=backend.device, requires_grad=True)
    outputs = ops.random_masking(2, 20, 0.5, noise=noise, backend=backend.name)
    assert not any(out.requires_grad for out in outputs)
    assert_same(outputs, reference.random_masking(noise.detach(), 10))


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
def test_bad_input_is_a_clear_error(backend, kwargs, error, message):
    kwargs = {name: v.to(backend.device) if isinstance(v, torch.Tensor) else v for name, v in kwargs.items()}
    arguments = {"batch_size": 2, "num_patches": 16, "mask_ratio": 0.5} | kwargs
    with pytest.raises(error, match=message):
        ops.random_masking(**arguments, backend=backend.name)


@pytest.mark.backends("triton", "cuda")
def test_check_needs_a_usable_device(backend):
    noise = torch.rand(2, 8, device="meta")
    assert "noise is on meta" in dispatch.explain("random_masking", noise, 4)[backend.name]


@pytest.mark.backends("cuda")
def test_cuda_refuses_rows_longer_than_its_shared_memory_sort(backend):
    noise = torch.rand(2, 1025, device=backend.device)
    assert "patches is 1025" in dispatch.explain("random_masking", noise, 256)["cuda"]


@pytest.mark.gpu
@pytest.mark.backends("triton")  # one inductor build per op: the GPU stage has little time
def test_torch_compile_inductor_public_op_gpu(backend):
    def masking(noise):
        ids_keep, ids_restore, mask = ops.random_masking(8, 196, 0.75, noise=noise, backend=backend.name)
        return ids_keep + 1, ids_restore, mask * 2

    noise = torch.rand(8, 196, device="cuda")
    torch._dynamo.reset()
    got = torch.compile(masking, fullgraph=True)(noise)
    ids_keep, ids_restore, mask = reference.random_masking(noise, 49)
    assert_same(got, (ids_keep + 1, ids_restore, mask * 2))


# --- the primitive, on every namespace -------------------------------------------------------------------


def check_against_stable_argsort(ns, length, dtype):
    noise = tricky_noise(length, dtype, ns.device)
    for keep in kept_counts(length):
        assert_same(ns.ops.random_masking(noise, keep), reference.random_masking(noise, keep))


@pytest.mark.primitives("random_masking")
@pytest.mark.parametrize("length", [n for n in LENGTHS if n <= 64])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_random_masking_equals_stable_argsort(ns, length, dtype):
    """Ties, signed zeros, NaN and +inf in the noise; several kept counts (float64 noise: Triton's, below)."""
    check_against_stable_argsort(ns, length, dtype)


@pytest.mark.primitives("random_masking")
@pytest.mark.namespaces("mae_fast_emu", "mae_fast")
@pytest.mark.parametrize("length", [n for n in LENGTHS if n > 64])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_random_masking_long_rows(ns, length, dtype):
    """The CUDA kernel's shared-memory sort up to its limit of 1024 patches. (Triton's long rows: the
    poisoned-output and at-scale tests below; its interpreter ranks a 1000-patch row in seconds.)"""
    check_against_stable_argsort(ns, length, dtype)


@pytest.mark.primitives("random_masking")
def test_opcheck(ns):
    noise = torch.rand(3, 45, device=ns.device)
    torch.library.opcheck(ns.ops.random_masking.default, (noise, 11))


@pytest.mark.primitives("random_masking")
def test_torch_compile_fullgraph(ns):
    """The fake impl lets dynamo trace the primitive into one graph (backend="aot_eager" on the CPU).

    The primitive itself: the public op's dispatcher also runs the other backends' checks, whose tracing
    is not this kernel's concern (the GPU test above compiles the public op with inductor).
    """

    def masking(noise):
        ids_keep, ids_restore, mask = ns.ops.random_masking(noise, 10)
        return ids_keep + 1, ids_restore, mask * 2

    noise = torch.rand(2, 40, device=ns.device)
    torch._dynamo.reset()
    got = torch.compile(masking, fullgraph=True, backend="aot_eager")(noise)
    ids_keep, ids_restore, mask = reference.random_masking(noise, 10)
    assert_same(got, (ids_keep + 1, ids_restore, mask * 2))


# --- the Triton kernel: every output written, ahead-of-time builds ---------------------------------------


def _run_poisoned(noise, len_keep):
    """The kernel into outputs filled with -7 and NaN: an element it does not write fails the comparison."""
    batch, length = noise.shape
    outputs = (
        torch.full((batch, len_keep), -7, device=noise.device, dtype=torch.int64),
        torch.full((batch, length), -7, device=noise.device, dtype=torch.int64),
        torch.full((batch, length), float("nan"), device=noise.device, dtype=torch.float32),
    )
    kernel.random_masking_into(noise, len_keep, *outputs)
    return outputs


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_L{}_r{}".format(*c))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (torch.float64,), ids=str)
def test_triton_kernel_writes_every_output(device, case, dtype):
    batch, length, ratio = case
    len_keep = reference.num_kept(length, ratio)
    noise = torch.rand(batch, length, device=device).to(dtype)  # low precision: many ties
    assert_same(_run_poisoned(noise, len_keep), reference.random_masking(noise, len_keep))


@pytest.mark.parametrize("levels", [1, 3], ids=["all_equal", "three_values"])
def test_triton_ties_go_to_the_lower_index(device, levels):
    noise = torch.randint(0, levels, (2, 150), device=device).float() / 4
    noise[1, ::2] = -0.0  # -0.0 and +0.0 tie
    len_keep = 40
    outputs = _run_poisoned(noise, len_keep)
    assert_same(outputs, reference.random_masking(noise, len_keep))
    if levels == 1:
        assert torch.equal(outputs[1][0], torch.arange(150, device=device))


def test_triton_nan_and_infinities_sort_as_torch_sort(device):
    """The kernel's rule (NaN above +inf, NaNs tie) equals torch's stable sort, which the reference uses."""
    noise = torch.rand(3, 70, device=device)
    noise[0, [3, 10, 11, 69]] = float("nan")
    noise[1, [0, 5]] = float("inf")
    noise[1, [6, 8]] = float("nan")
    noise[2, [2, 40]] = -float("inf")
    noise[2, :] = torch.where(noise[2] > 0.9, float("nan"), noise[2])
    assert_same(_run_poisoned(noise, 68), reference.random_masking(noise, 68))


@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "length"), [(256, 196), (4, 4096)])
def test_triton_gpu_matches_reference_at_scale(batch, length):
    noise = torch.randint(0, 1000, (batch, length), device="cuda").float() / 1000  # many ties
    len_keep = reference.num_kept(length, 0.75)
    assert_same(_run_poisoned(noise, len_keep), reference.random_masking(noise, len_keep))


def aot_jobs():
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
    return jobs


register_aot_jobs("masking", aot_jobs())


def test_triton_kernel_compiles_for_sm90_and_sm80_without_spills():
    check_aot_builds("masking")
