"""masked_mse_loss: the reference's formula (fp32 accumulation, unbiased variance), differentiable in every input."""

from mae_fast import dispatch, reference
from mae_fast.backends.torch._support import SUPPORT

dispatch.register("masked_mse_loss", "torch", SUPPORT)(reference.masked_mse_loss)
