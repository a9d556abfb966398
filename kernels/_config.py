"""How the Triton kernels run here; shared by every kernel module.

Under TRITON_INTERPRET=1 (CPU tests) bf16 arithmetic and tl.dot act on raw bits and fp32 -> bf16
stores truncate, so kernels load bf16 as fp32 when ``UPCAST_BF16`` is set (a constexpr argument:
the GPU build keeps bf16 tensor-core dots).
"""

import contextlib
import os
import re

import torch
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
UPCAST_BF16 = INTERPRETING

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def device_guard(tensor: torch.Tensor):
    """Launch on ``tensor``'s GPU: Triton launches on the current device and its current stream."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def interpreter_unusable_reason() -> str | None:
    """Why Triton's interpreter (TRITON_INTERPRET=1) cannot run the kernels with the installed packages, or
    None. Triton before 3.8 converts numpy arrays to Python scalars in its interpreter, which numpy 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars") at kernel launches.
    Only the interpreter is affected: callers ask this when TRITON_INTERPRET=1 is set, GPU runs never need to."""
    import numpy
    import triton

    if _major_minor(triton.__version__) < (3, 8) and _major_minor(numpy.__version__) >= (2, 4):
        return (
            f"Triton's interpreter (TRITON_INTERPRET=1) cannot run on triton {triton.__version__} with numpy "
            f"{numpy.__version__}: triton < 3.8 needs numpy < 2.4 there. Install 'numpy<2.4' for interpreter "
            "(CPU) runs, or triton >= 3.8; GPU runs are unaffected."
        )
    return None
