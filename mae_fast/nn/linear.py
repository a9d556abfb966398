"""Linear: nn.Linear (same parameters, init and state_dict) whose fp32 CPU GEMMs take mae_fast.cpu_gemm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mae_fast import cpu_gemm, dispatch


class Linear(nn.Linear):
    """Drop-in ``nn.Linear``. With ``backend`` "reference" (or None while the global default is "reference") it is
    F.linear; with any other backend its fp32 CPU products run where :func:`mae_fast.cpu_gemm.cpu_gemm` says
    (oneDNN on AMD CPUs with AVX-512, torch's own GEMM elsewhere) and every other input is F.linear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: str | None = None, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.backend = dispatch.validate_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.backend or dispatch.get_backend()) == "reference":
            return F.linear(x, self.weight, self.bias)
        return cpu_gemm.linear(x, self.weight, self.bias)
