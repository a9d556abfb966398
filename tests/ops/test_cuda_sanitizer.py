"""Every CUDA kernel of mae_fast._C, forward and backward, on one small case under compute-sanitizer (memcheck).

One process under the sanitizer for all the ops (its start-up costs more than the kernels): the GPU stage of
benchmarks/gpu_check.sh runs it with the other gpu-marked tests. Skipped without a GPU, with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mae_fast import _extension

SANITIZED_SCRIPT = textwrap.dedent(
    """
    import torch
    import mae_fast.ops as ops
    dev = "cuda"
    imgs = torch.randn(2, 3, 16, 16, device=dev, requires_grad=True)
    ids_keep, ids_restore, mask = ops.random_masking(2, 16, 0.75, device=dev, backend="cuda")
    ops.patchify_gather(imgs, ids_keep, 4, backend="cuda").sum().backward()
    repeated = torch.tensor([[1, 1, 7, 1], [0, 2, 2, 15]], device=dev)
    ops.patchify_gather(imgs, repeated, 4, backend="cuda").sum().backward()
    ops.patchify(imgs, 4, backend="cuda").sum().backward()
    ops.patchify_gather(imgs.detach().half()[..., :12, :12].contiguous(), ids_keep[:, :2] % 9, 3, backend="cuda")
    weight = torch.randn(32, 3, 4, 4, device=dev, requires_grad=True)
    pos = torch.randn(16, 32, device=dev)
    ops.patch_embed_gather(imgs, ids_keep, weight, None, pos, backend="cuda").sum().backward()
    x = torch.randn(2, 5, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
    token = torch.randn(32, device=dev, requires_grad=True)
    ops.unshuffle_mask_tokens(x, token, ids_restore, torch.randn(17, 32, device=dev), backend="cuda").sum().backward()
    pred = torch.randn(2, 16, 48, device=dev, requires_grad=True)
    ops.masked_mse_loss(pred, imgs.detach(), mask, 4, backend="cuda").backward()
    cu = torch.tensor([0, 18, 18, 37], device=dev, dtype=torch.int32)
    for shape, cu in (((2, 19, 2, 64), None), ((37, 2, 80), cu)):
        q = torch.randn(shape, device=dev, dtype=torch.float16, requires_grad=True)
        ops.visible_attention(q, q, q, cu_seqlens=cu, max_seqlen=19, backend="cuda").sum().backward()
    qkv = torch.randn(2, 19, 3 * 2 * 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ops.qkv_attention(qkv, 2, backend="cuda").sum().backward()
    torch.cuda.synchronize()
    print("sanitized run done")
    """
)


@pytest.mark.gpu
def test_kernels_under_compute_sanitizer():
    assert _extension.available(), _extension.unavailable_reason()
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        pytest.skip("compute-sanitizer is not installed on this machine")
    result = subprocess.run(
        [tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", SANITIZED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0 and "sanitized run done" in result.stdout, report
    assert "ERROR SUMMARY: 0 errors" in result.stdout + result.stderr, report
