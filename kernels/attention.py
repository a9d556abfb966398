"""Flash attention over short visible-token sequences: fixed length [B, N, H, d] or packed [T, H, d] + cu_seqlens.

MAE's encoder sees 50 or 65 tokens and its decoder 197, far below the 128-token tiles of FlashAttention.
The block sizes here follow the sequence: when the keys and values of a whole (sequence, head) fit one tile
(N <= 128 for head dims up to 64, and N <= 256 at d = 64 in the forward) each program makes a single pass
over them, and the backward computes dq, dk and dv in ONE program per (sequence, head) without atomics.
Longer sequences use the online-softmax loop over key tiles and a separate dq kernel, still without atomics:
every value is reduced by one program in a fixed order, so results are bitwise deterministic.

Every tensor is addressed through (batch, token, head) strides with a unit stride along the head dim, so
q, k and v can be views of the qkv Linear output [B, N, 3, H, d] and the gradients can be written straight
into one dqkv buffer. Packed sequences use batch stride 0 and take their first token from cu_seqlens.
Softmax statistics and all accumulation are fp32; lse is stored as natural-log fp32 ([B, H, N] or [H, T]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from mae_fast.kernels._config import UPCAST_BF16, device_guard


@triton.jit
def _this_sequence(CU_SEQLENS, seqlen, num_heads, VARLEN: tl.constexpr):
    """(sequence, head, first token, length) of the (sequence, head) pair on grid axis 0 (up to 2**31 - 1
    programs; axes 1 and 2 stop at 65535)."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    if VARLEN:
        start = tl.load(CU_SEQLENS + b).to(tl.int64)
        n = tl.load(CU_SEQLENS + b + 1) - start
    else:
        start = 0
        n = seqlen
    return b, h, start, n


@triton.jit
def _attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    CU_SEQLENS,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_lb,
    stride_lh,
    seqlen,
    num_heads,
    head_dim,
    scale,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(1)
    b, h, start, n = _this_sequence(CU_SEQLENS, seqlen, num_heads, VARLEN)
    if pid_m * BLOCK_M >= n:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n
    mask_d = offs_d < head_dim
    q_base = Q + b * stride_qb + start * stride_qt + h * stride_qh
    k_base = K + b * stride_kb + start * stride_kt + h * stride_kh
    v_base = V + b * stride_vb + start * stride_vt + h * stride_vh

    q = tl.load(
        q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < n
        kt = tl.load(
            k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None], other=0.0
        )
        v = tl.load(
            v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        )
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_base = Out + b * stride_ob + start * stride_ot + h * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_ot + offs_d[None, :],
        acc,
        mask=mask_m[:, None] & mask_d[None, :],
    )
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + b * stride_lb + h * stride_lh + start + offs_m, lse, mask=mask_m)


@triton.jit
def _attention_bwd_kv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    DK,
    DV,
    CU_SEQLENS,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_lb,
    stride_lh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    stride_dvb,
    stride_dvt,
    stride_dvh,
    seqlen,
    num_heads,
    head_dim,
    scale,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WRITE_DQ: tl.constexpr,
):
    """dk, dv of one key tile, looping over all query tiles; with WRITE_DQ (the tile holds every key of the
    sequence) also the complete dq of each query tile, so short sequences need one launch and no atomics.

    D = rowsum(P * dP) is formed in fp32 from the unrounded P and dP: here when the tile holds every key
    (WRITE_DQ), else read from DELTA, which the dq kernel wrote first. (rowsum(dO * O), the usual shortcut,
    reads O rounded to 16 bits: an error in dS that does not shrink with P.)"""
    pid_n = tl.program_id(1)
    b, h, start, n = _this_sequence(CU_SEQLENS, seqlen, num_heads, VARLEN)
    if pid_n * BLOCK_N >= n:
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n
    mask_d = offs_d < head_dim
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(
        K + b * stride_kb + (start + offs_n[:, None]) * stride_kt + h * stride_kh + offs_d[None, :],
        mask=mask_nd,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + (start + offs_n[:, None]) * stride_vt + h * stride_vh + offs_d[None, :],
        mask=mask_nd,
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + b * stride_qb + start * stride_qt + h * stride_qh
    do_base = DO + b * stride_dob + start * stride_dot + h * stride_doh
    lse_base = LSE + b * stride_lb + h * stride_lh + start
    delta_base = DELTA + b * stride_lb + h * stride_lh + start
    dq_base = DQ + b * stride_dqb + start * stride_dqt + h * stride_dqh
    qk_scale = scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, n, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < n
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=mask_md, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=mask_md, other=0.0)
        lse = tl.load(lse_base + rows, mask=mask_m, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None] * 1.4426950408889634)
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if WRITE_DQ:
            delta = tl.sum(p * dp, 1)  # every key is in this tile
        else:
            delta = tl.load(delta_base + rows, mask=mask_m, other=0.0)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
        if WRITE_DQ:
            dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * scale
            tl.store(dq_base + rows[:, None] * stride_dqt + offs_d[None, :], dq, mask=mask_md)

    dk = dk * scale
    dk_ptrs = DK + b * stride_dkb + (start + offs_n[:, None]) * stride_dkt + h * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + (start + offs_n[:, None]) * stride_dvt + h * stride_dvh + offs_d[None, :]
    tl.store(dk_ptrs, dk, mask=mask_nd)
    tl.store(dv_ptrs, dv, mask=mask_nd)


@triton.jit
def _key_tile(
    q, do, lse, k_base, v_base, start_n, n, stride_kt, stride_vt, offs_n, offs_d, mask_m, mask_d, qk_scale,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """For the keys start_n.. of one query tile: (k, P, dP), P = exp(q k^T * scale - lse) in fp32, zero where
    masked, and dP = dO v^T (fp32): what both passes of the dq kernel need."""
    cols = start_n + offs_n
    mask_n = cols < n
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=mask_nd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.exp2(s * qk_scale - lse[:, None] * 1.4426950408889634)
    p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
    return k, p, tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)


@triton.jit
def _attention_bwd_q_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    CU_SEQLENS,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_lb,
    stride_lh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    seqlen,
    num_heads,
    head_dim,
    scale,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq of one query tile, looping over the key tiles twice (long sequences only): first for
    D = rowsum(P * dP) in fp32 from the unrounded P and dP, which it also writes to DELTA for the dk/dv
    kernel launched after it, then for dq."""
    pid_m = tl.program_id(1)
    b, h, start, n = _this_sequence(CU_SEQLENS, seqlen, num_heads, VARLEN)
    if pid_m * BLOCK_M >= n:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n
    mask_d = offs_d < head_dim
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(
        Q + b * stride_qb + (start + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :],
        mask=mask_md,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + (start + offs_m[:, None]) * stride_dot + h * stride_doh + offs_d[None, :],
        mask=mask_md,
        other=0.0,
    )
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + start + offs_m, mask=mask_m, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_base = K + b * stride_kb + start * stride_kt + h * stride_kh
    v_base = V + b * stride_vb + start * stride_vt + h * stride_vh
    qk_scale = scale * 1.4426950408889634

    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, n, BLOCK_N):
        _, p, dp = _key_tile(
            q, do, lse, k_base, v_base, start_n, n, stride_kt, stride_vt, offs_n, offs_d, mask_m, mask_d, qk_scale,
            UPCAST, DOT_PRECISION,
        )  # fmt: skip
        delta += tl.sum(p * dp, 1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + start + offs_m, delta, mask=mask_m)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n, BLOCK_N):
        k, p, dp = _key_tile(
            q, do, lse, k_base, v_base, start_n, n, stride_kt, stride_vt, offs_n, offs_d, mask_m, mask_d, qk_scale,
            UPCAST, DOT_PRECISION,
        )  # fmt: skip
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION)

    dq = dq * scale
    dq_ptrs = DQ + b * stride_dqb + (start + offs_m[:, None]) * stride_dqt + h * stride_dqh + offs_d[None, :]
    tl.store(dq_ptrs, dq, mask=mask_md)


# --- launch configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BackwardConfig:
    """dk/dv kernel tiles; ``single_tile``: one key tile holds the whole sequence and the same program
    writes dq, otherwise the dq kernel runs with its own tiles (q_block_m x q_block_n)."""

    block_m: int
    block_n: int
    block_d: int
    single_tile: bool
    num_warps: int
    num_stages: int
    q_block_m: int = 32
    q_block_n: int = 64
    q_num_warps: int = 8


def _pow2(value: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(value))


# The tables below were chosen from ahead-of-time builds for sm_90 and sm_80 (tests/test_attention_aot.py):
# with bf16 / fp16 inputs every listed config compiles without register spills for sm_90 under triton 3.6
# (the GPU machine's) and 3.8 (CI's), so one table serves both versions; for sm_80 too, except the one-tile
# backward at 64 < N <= 128, d = 64 under 3.8 (40 B). fp32 inputs (exact IEEE dots, no tensor cores) spill
# under either version at most sizes.


def forward_config(max_seqlen: int, head_dim: int) -> ForwardConfig:
    """Forward tiles: one key tile holds the whole sequence for N <= 128 at d <= 64 and for N <= 256 at
    d = 64 (ViT decoders at d = 32 take two 128-token tiles: one 256-token tile spills); otherwise the
    online-softmax loop runs over 64-token key tiles."""
    block_d = _pow2(head_dim)
    whole = _pow2(max_seqlen)
    if block_d <= 64:
        if whole <= 64:
            return ForwardConfig(min(whole, 64), whole, block_d, num_warps=4, num_stages=1)
        if whole == 128 and block_d == 64:
            return ForwardConfig(64, 128, block_d, num_warps=8, num_stages=2)
        if whole == 256 and block_d == 64:
            return ForwardConfig(32, 256, block_d, num_warps=8, num_stages=1)
        if whole <= 256:
            return ForwardConfig(64, 128, block_d, num_warps=4, num_stages=1)
        return ForwardConfig(64, 64, block_d, num_warps=4, num_stages=2)
    if whole <= 32:
        return ForwardConfig(whole, whole, block_d, num_warps=4, num_stages=1)
    return ForwardConfig(64, 64, block_d, num_warps=8, num_stages=2)


def backward_config(max_seqlen: int, head_dim: int) -> BackwardConfig:
    """Backward tiles: for N <= 128 (d <= 64) one program per (sequence, head) computes dq, dk and dv;
    longer sequences and d > 64 run the dk/dv kernel over key tiles and a separate dq kernel. At d > 64 the
    key tile is 32 tokens: a 64-token one spills on sm_90 under triton 3.6 with 4 or 8 warps, 1 or 2 stages."""
    block_d = _pow2(head_dim)
    whole = _pow2(max_seqlen)
    if block_d <= 64:
        if whole <= 32:
            return BackwardConfig(16, whole, block_d, True, num_warps=4, num_stages=1)
        if whole == 64:
            return BackwardConfig(32, 64, block_d, True, num_warps=8, num_stages=1)
        if whole == 128:
            return BackwardConfig(16, 128, block_d, True, num_warps=8, num_stages=1)
        if block_d <= 32:
            return BackwardConfig(16, 64, block_d, False, num_warps=8, num_stages=2, q_block_m=64, q_num_warps=4)
        return BackwardConfig(16, 32, block_d, False, num_warps=4, num_stages=2)
    # d > 64: the dq kernel's two passes over the keys (D first, then dq) keep q and dO tiles live across both;
    # 32-key tiles keep it spill-free under triton 3.6 (64-key tiles spill 256 B there)
    return BackwardConfig(16, 32, block_d, False, num_warps=8, num_stages=2, q_block_n=32)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 dots, not TF32


def upcasts(dtype: torch.dtype) -> bool:
    """True when bf16 runs as fp32 inside the kernels (the interpreter), so outputs must be staged in fp32."""
    return UPCAST_BF16 and dtype == torch.bfloat16


# --- launchers ---------------------------------------------------------------------------------------
# A "view" below is one of q, k, v, out, ... given as [B, N, H, d] (fixed) or [T, H, d] (packed); the
# launchers read its strides and need stride 1 along d. lse is [B, H, N] or [H, T] fp32, contiguous.


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    if x.stride(-1) != 1:
        raise ValueError(f"attention kernels need a unit stride along the head dim, got strides {x.stride()}")
    if varlen:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _geometry(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(number of sequences, fixed seqlen or 0, heads, head dim)."""
    if cu_seqlens is not None:
        return cu_seqlens.numel() - 1, 0, q.shape[1], q.shape[2]
    return q.shape[0], q.shape[1], q.shape[2], q.shape[3]


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
) -> None:
    """Write softmax(q k^T * scale) v into ``out`` and the fp32 natural-log lse into ``lse``."""
    varlen = cu_seqlens is not None
    seqs, seqlen, heads, head_dim = _geometry(q, cu_seqlens)
    if seqs == 0 or heads == 0 or max_seqlen == 0 or q.numel() == 0:
        return
    cfg = forward_config(max_seqlen, head_dim)
    grid = (seqs * heads, triton.cdiv(max_seqlen, cfg.block_m))
    with device_guard(q):
        _attention_fwd_kernel[grid](
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens if varlen else q,
            *_strides(q, varlen),
            *_strides(k, varlen),
            *_strides(v, varlen),
            *_strides(out, varlen),
            *_lse_strides(lse, varlen),
            seqlen,
            heads,
            head_dim,
            scale,
            VARLEN=varlen,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_D=cfg.block_d,
            UPCAST=upcasts(q.dtype),
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
) -> None:
    """Write the gradients of the forward into ``dq``, ``dk``, ``dv`` (deterministic: no atomics)."""
    varlen = cu_seqlens is not None
    seqs, seqlen, heads, head_dim = _geometry(q, cu_seqlens)
    if seqs == 0 or heads == 0 or max_seqlen == 0 or q.numel() == 0:
        return
    cfg = backward_config(max_seqlen, head_dim)
    common = dict(
        VARLEN=varlen,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d,
        UPCAST=upcasts(q.dtype),
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    cu = cu_seqlens if varlen else q
    # D per query row, laid out as lse (written by the dq kernel, read by the dk/dv one); unused single-tile
    delta = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=q.device)
    operands = (
        *_strides(q, varlen),
        *_strides(k, varlen),
        *_strides(v, varlen),
        *_strides(do, varlen),
        *_lse_strides(lse, varlen),
    )
    if not cfg.single_tile:
        q_config = dict(common, BLOCK_M=cfg.q_block_m, BLOCK_N=cfg.q_block_n, num_warps=cfg.q_num_warps, num_stages=1)
        grid = (seqs * heads, triton.cdiv(max_seqlen, cfg.q_block_m))
        with device_guard(q):
            _attention_bwd_q_kernel[grid](
                q, k, v, do, lse, delta, dq, cu, *operands, *_strides(dq, varlen), seqlen, heads, head_dim, scale,
                **q_config,
            )  # fmt: skip
    grid = (seqs * heads, triton.cdiv(max_seqlen, cfg.block_n))
    with device_guard(q):
        _attention_bwd_kv_kernel[grid](
            q, k, v, do, lse, delta, dq, dk, dv, cu, *operands, *_strides(dq, varlen), *_strides(dk, varlen),
            *_strides(dv, varlen), seqlen, heads, head_dim, scale, WRITE_DQ=cfg.single_tile, **common,
        )  # fmt: skip
