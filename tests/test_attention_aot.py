"""Ahead-of-time builds of the attention kernels for sm_90 and sm_80 (no GPU needed).

Every config that ``forward_config`` / ``backward_config`` pick, under the installed triton, for the MAE
shapes and for one (N, d) of each other entry of their tables must compile without register spills; the
sm_90 forward must use tensor-core instructions. The configs are asked of those functions when the tests
run, so a table that differed by triton version would be checked as the installed version runs it. CI runs
triton 3.8; the GPU machine's triton 3.6 is checked with scripts/gpu_stack_env.sh. The builds run in fresh
processes without TRITON_INTERPRET (tests/triton_aot.py).
"""

import json
import os

import pytest
import triton
from mae_fast.kernels import attention as kernels
from triton_aot import compile_reports

CONSTEXPRS = ("VARLEN", "BLOCK_M", "BLOCK_N", "BLOCK_D", "UPCAST", "DOT_PRECISION", "WRITE_DQ")
SHAPES = [  # (seqlen, head dim, archs)
    (50, 64, (90, 80)),  # ViT-B/L encoder
    (65, 80, (90, 80)),  # ViT-H encoder: d = 80 runs at block_d = 128 (the dk/dv tile spilled under triton 3.6)
    (197, 32, (90, 80)),  # decoder
    (17, 64, (90,)),  # short sequences: one 32-token tile
    (17, 128, (90,)),  # short at d = 128 (multi-tile backward, as every d > 64)
    (65, 32, (90,)),  # one 128-token tile at d = 32
    (127, 64, (90,)),  # one 128-token tile at d = 64 (sm_80 spills 40 B here under triton 3.8)
    (197, 64, (90,)),  # the forward's 256-token tile at d = 64, multi-tile backward
    (1024, 64, (90,)),  # long-sequence fallback
    (1024, 128, (90,)),  # long-sequence fallback at d = 128
]
CASES = [(seqlen, head_dim, arch) for seqlen, head_dim, archs in SHAPES for arch in archs]


def _job(kernel: str, arch: int, block_m, block_n, block_d, num_warps, num_stages, dtype="bf16", **extra):
    constexprs = dict(
        VARLEN=True,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        UPCAST=False,
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
        **extra,
    )
    return {
        "kernel": kernel,
        "dtype": dtype,
        "constexprs": constexprs,
        "arch": arch,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def _jobs_for(seqlen: int, head_dim: int, arch: int) -> list[dict]:
    """The kernels the launchers run at (seqlen, head_dim), with the configs they pick for it."""
    fwd = kernels.forward_config(seqlen, head_dim)
    bwd = kernels.backward_config(seqlen, head_dim)
    jobs = [
        _job("_attention_fwd_kernel", arch, fwd.block_m, fwd.block_n, fwd.block_d, fwd.num_warps, fwd.num_stages),
        _job(
            "_attention_bwd_kv_kernel",
            arch,
            bwd.block_m,
            bwd.block_n,
            bwd.block_d,
            bwd.num_warps,
            bwd.num_stages,
            WRITE_DQ=bwd.single_tile,
        ),
    ]
    if not bwd.single_tile:
        jobs.append(
            _job("_attention_bwd_q_kernel", arch, bwd.q_block_m, bwd.q_block_n, bwd.block_d, bwd.q_num_warps, 1)
        )
    return jobs


def _signature(kernel: str, dtype: str) -> dict:
    """Argument types by the kernels' naming: tensors are capitalised, scale is fp32, the rest i32."""
    types = {}
    for name in getattr(kernels, kernel).arg_names:
        if name in CONSTEXPRS:
            continue
        if name == "CU_SEQLENS":
            types[name] = "*i32"
        elif name in ("LSE", "DELTA"):
            types[name] = "*fp32"
        elif name[0].isupper():
            types[name] = "*" + dtype
        else:
            types[name] = "fp32" if name == "scale" else "i32"
    return types


def _key(job: dict) -> str:
    return json.dumps(
        {name: job[name] for name in ("kernel", "dtype", "constexprs", "arch", "num_warps", "num_stages")}
    )


def _fp16_forward_job() -> dict:
    fwd = kernels.forward_config(50, 64)
    return _job("_attention_fwd_kernel", 90, fwd.block_m, fwd.block_n, fwd.block_d, fwd.num_warps, 1, "fp16")


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    """Report of every distinct build of CASES (and an fp16 forward), by _key of its job."""
    jobs = {}
    for case in CASES:
        for job in _jobs_for(*case):
            jobs.setdefault(_key(job), job)
    fp16 = _fp16_forward_job()
    jobs.setdefault(_key(fp16), fp16)
    for job in jobs.values():
        job.update(module=kernels.__name__, signature=_signature(job["kernel"], job["dtype"]))
    out = compile_reports(list(jobs.values()), processes=min(4, os.cpu_count() or 1))
    print(f"triton {triton.__version__}")
    for report in out:
        c = report["constexprs"]
        config = f"M{c['BLOCK_M']} N{c['BLOCK_N']} D{c['BLOCK_D']} w{report['num_warps']} s{report['num_stages']}"
        print(f"{config}: {report['text']}")
    return {_key(report): report for report in out}


@pytest.mark.parametrize(
    "seqlen, head_dim, arch", [pytest.param(*case, id="N{}-d{}-sm{}".format(*case)) for case in CASES]
)
def test_picked_configs_build_without_spills(reports, seqlen, head_dim, arch):
    built = [reports[_key(job)] for job in _jobs_for(seqlen, head_dim, arch)]
    spilling = [
        f"{r['kernel']} {r['constexprs']} warps={r['num_warps']} stages={r['num_stages']}: {r['text']}"
        for r in built
        if r["spills"]
    ]
    assert not spilling, f"triton {triton.__version__}: {spilling}"


def test_grid_covers_every_backward_tile_kind():
    picked = {(kernels.backward_config(n, d).single_tile, kernels.backward_config(n, d).block_d) for n, d, _ in SHAPES}
    assert {(True, 32), (True, 64), (False, 32), (False, 64), (False, 128)} <= picked


def test_sm90_forward_uses_tensor_cores(reports):
    forwards = [r for r in reports.values() if r["kernel"] == "_attention_fwd_kernel" and r["arch"] == 90]
    assert {r["dtype"] for r in forwards} == {"bf16", "fp16"}
    assert all(r["tensor_cores"] for r in forwards), [r["text"] for r in forwards]
