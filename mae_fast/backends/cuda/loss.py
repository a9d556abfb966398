"""masked_mse_loss on the CUDA kernel of csrc/masked_mse_loss.cu: the loss and pred's gradient in one pass."""

from mae_fast import dispatch
from mae_fast.backends.cuda._library import OPS, support
from mae_fast.ops.loss import loss_and_saved_grad

#: One target patch per warp in 48 KiB of shared memory.
MAX_PATCH_VALUES = 12288
SUPPORT = support("the CUDA loss kernel", grad_inputs=("pred",), maximum={"patch_values": MAX_PATCH_VALUES})


@dispatch.register("masked_mse_loss", "cuda", SUPPORT)
def _masked_mse_loss(pred, imgs, mask, patch_size, norm_pix, eps):
    return loss_and_saved_grad(OPS, pred, imgs, mask, patch_size, norm_pix, eps)
