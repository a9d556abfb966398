"""masked_mse_loss: the reference (differentiable in pred, imgs and mask; repeated backward passes work)."""

from mae_fast import dispatch, reference
from mae_fast.backends.reference._support import SUPPORT

dispatch.register("masked_mse_loss", "reference", SUPPORT)(reference.masked_mse_loss)
