"""Ahead-of-time builds of the attention kernels for sm_90 and sm_80 (no GPU needed).

Every default config that the launchers pick for the MAE shapes, and for the long-sequence fallback,
must compile without register spills; the sm_90 forward must use tensor-core instructions.
The builds run in one fresh process without TRITON_INTERPRET (tests/triton_aot.py).
"""

import pytest
from mae_fast.kernels import attention as kernels
from triton_aot import compile_reports

CONSTEXPRS = ("VARLEN", "BLOCK_M", "BLOCK_N", "BLOCK_D", "UPCAST", "DOT_PRECISION", "WRITE_DQ")
SHAPES = [  # (seqlen, head dim, archs)
    (50, 64, (90, 80)),  # ViT-B/L encoder
    (65, 80, (90,)),  # ViT-H encoder
    (197, 32, (90,)),  # decoder
    (1024, 64, (90,)),  # long-sequence fallback
]


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
    for job in jobs:
        job["label"] = f"N={seqlen} d={head_dim}"
    return jobs


def _signature(kernel: str, dtype: str) -> dict:
    """Argument types by the kernels' naming: tensors are capitalised, scale is fp32, the rest i32."""
    types = {}
    for name in getattr(kernels, kernel).arg_names:
        if name in CONSTEXPRS:
            continue
        if name == "CU_SEQLENS":
            types[name] = "*i32"
        elif name == "LSE":
            types[name] = "*fp32"
        elif name[0].isupper():
            types[name] = "*" + dtype
        else:
            types[name] = "fp32" if name == "scale" else "i32"
    return types


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    jobs = [job for seqlen, head_dim, archs in SHAPES for arch in archs for job in _jobs_for(seqlen, head_dim, arch)]
    fwd = kernels.forward_config(50, 64)
    jobs.append(_job("_attention_fwd_kernel", 90, fwd.block_m, fwd.block_n, fwd.block_d, fwd.num_warps, 1, "fp16"))
    jobs[-1]["label"] = "N=50 d=64 fp16"
    for job in jobs:
        job.update(module=kernels.__name__, signature=_signature(job["kernel"], job["dtype"]))
    out = compile_reports(jobs)
    for report in out:
        print(f"{report['label']}: {report['text']}")
    return out


def test_default_configs_build_for_sm90_and_sm80_without_spills(reports):
    assert {report["arch"] for report in reports} == {80, 90}
    spilling = [f"{r['label']}: {r['text']}" for r in reports if r["spills"]]
    assert not spilling, spilling


def test_sm90_forward_uses_tensor_cores(reports):
    forwards = [r for r in reports if r["kernel"] == "_attention_fwd_kernel" and r["arch"] == 90]
    assert {r["dtype"] for r in forwards} == {"bf16", "fp16"}
    assert all(r["tensor_cores"] for r in forwards), [r["text"] for r in forwards]
