"""``mae-fast info``: versions, the GPU, the extension, and which backend each op would use."""

from __future__ import annotations

import argparse
import platform

import torch

from mae_fast import _extension, cpu_gemm, dispatch


def _triton_version() -> str:
    try:
        import triton
    except ImportError as error:
        return f"not importable ({error})"
    return triton.__version__


def _sample_inputs(device: torch.device) -> dict[str, tuple]:
    """Small representative inputs per op, to ask the dispatcher which backend it would pick."""
    imgs = torch.zeros(1, 3, 32, 32, device=device)
    ids = torch.zeros(1, 4, dtype=torch.int64, device=device)
    restore = torch.arange(64, device=device)[None]
    q = torch.zeros(1, 5, 2, 16, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return {
        "patchify": (imgs, 4),
        "unpatchify": (torch.zeros(1, 64, 48, device=device), 4, (8, 8)),
        "patchify_gather": (imgs, ids, 4),
        "patch_embed_gather": (imgs, ids, torch.zeros(8, 3, 4, 4, device=device), None, None),
        "unshuffle_mask_tokens": (torch.zeros(1, 5, 8, device=device), torch.zeros(8, device=device), restore, None),
        "masked_mse_loss": (
            torch.zeros(1, 64, 48, device=device),
            imgs,
            torch.ones(1, 64, device=device),
            4,
            True,
            1e-6,
        ),
        "random_masking": (torch.rand(1, 64, device=device), 16),
        "visible_attention": (q, q, q, None, q.shape[1], 0.25),
        "qkv_attention": (torch.zeros(1, 5, 96, device=device, dtype=q.dtype), 2, None, 5, 0.25),
    }


def model_step_backends(device_type: str) -> dict[str, dict[str, int]]:
    """For each op of a ViT-B/16 MAE forward in bf16 (batch 2, mask ratio 0.75) on ``device_type``: how many of
    its calls "auto" sends to each backend. Traced on fake tensors: nothing runs, so "cuda" works without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mae_fast.models import create_model

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with FakeTensorMode(), torch.device(device_type), dispatch.recording() as picks:
            model = create_model("mae_vit_base_patch16", backend="auto")
            model(torch.randn(2, 3, 224, 224), 0.75)
    finally:
        torch.set_default_dtype(previous)
    counts: dict[str, dict[str, int]] = {}
    for op, backend in picks:
        counts.setdefault(op, {}).setdefault(backend, 0)
        counts[op][backend] += 1
    return counts


def report() -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [
        f"mae_fast   {__import__('mae_fast').__version__}",
        f"python     {platform.python_version()}",
        f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'})",
        f"triton     {_triton_version()}",
        f"GPU        {torch.cuda.get_device_name() if device.type == 'cuda' else 'none visible'}",
        f"extension  {'mae_fast._C loaded' if _extension.available() else _extension.unavailable_reason()}",
        f"default    backend={dispatch.get_backend()!r}",
        f"cpu gemm   fp32 Linear on CPU tensors: {cpu_gemm.describe()}",
        f"backends on {device.type} tensors (auto order {', '.join(dispatch.AUTO_ORDER)}):",
    ]
    for op, args in _sample_inputs(device).items():
        reasons = dispatch.explain(op, *args)
        try:
            chosen = dispatch.resolve(op, "auto", *args)
        except dispatch.BackendError:
            chosen = "none"
        lines.append(f"  {op:<22} -> {chosen}")
        for backend, reason in reasons.items():
            if reason is not None:
                lines.append(f"  {'':<22}    {backend}: {reason}")
    targets = [device.type] + (["cuda"] if device.type == "cpu" and torch.version.cuda is not None else [])
    for target in targets:
        note = " (fake tensors: what a GPU would run)" if target != device.type else ""
        picks = model_step_backends(target)
        lines.append(f"a ViT-B/16 MAE step in bf16 on {target}{note}:")
        for op, backends in picks.items():
            calls = ", ".join(f"{name} x{count}" for name, count in backends.items())
            lines.append(f"  {op:<22} -> {calls}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    print(report())
    return 0
