"""model(imgs, ..., return_pred=False): the training loop's path, where the last decoder block's output projection
and MLP, the decoder norm and the head run on the removed patches only.

Acceptance: the loss and every parameter's gradient equal those of the full forward (float64, so the only
difference is the order of additions), for fixed and per-sample mask ratios, with and without norm_pix, with
no decoder block, one and two, on the reference and the torch backends; Block(rows=) equals the full block's
rows, forward and backward, for [B, N, D] and packed tokens.
"""

import pytest
import torch
from tiny_models import tiny_mae

from mae_fast.nn import Block

EXACT = dict(atol=1e-12, rtol=1e-10)


def _loss_and_grads(model, imgs, mask_ratio, noise, return_pred):
    model.zero_grad(set_to_none=True)
    loss, pred, mask = model(imgs, mask_ratio, noise, return_pred=return_pred)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), pred, mask, grads


def _assert_same_training_signal(model, imgs, mask_ratio, noise):
    full_loss, full_pred, full_mask, full_grads = _loss_and_grads(model, imgs, mask_ratio, noise, True)
    loss, pred, mask, grads = _loss_and_grads(model, imgs, mask_ratio, noise, False)
    assert pred is None and full_pred is not None
    torch.testing.assert_close(mask, full_mask, atol=0, rtol=0)
    torch.testing.assert_close(loss, full_loss, **EXACT)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], **EXACT, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("decoder_depth", [0, 1, 2])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_fixed_ratio_same_loss_and_gradients(backend, decoder_depth, norm_pix_loss):
    model = tiny_mae(img_size=20, decoder_depth=decoder_depth, norm_pix_loss=norm_pix_loss, backend=backend).double()
    imgs = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    noise = torch.rand(3, 25)
    _assert_same_training_signal(model, imgs, 0.6, noise)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_per_sample_ratios_same_loss_and_gradients(backend):
    model = tiny_mae(decoder_depth=2, norm_pix_loss=True, backend=backend).double()
    imgs = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    ratios = torch.tensor([0.75, 0.0, 0.9, 0.5])  # the second image keeps every patch: no row of its own
    _assert_same_training_signal(model, imgs, ratios, torch.rand(4, 16))


def test_return_pred_must_be_a_bool():
    model = tiny_mae()
    with pytest.raises(TypeError, match="return_pred must be a bool"):
        model(torch.randn(1, 3, 16, 16), 0.75, return_pred="no")


@pytest.mark.parametrize("packed", [False, True])
def test_block_rows_equal_the_full_blocks_rows(packed):
    block = Block(24, 3, backend="reference").double()
    if packed:
        x, cu_seqlens, longest = torch.randn(11, 24, dtype=torch.float64), torch.tensor([0, 4, 11]).int(), 7
    else:
        x, cu_seqlens, longest = torch.randn(2, 7, 24, dtype=torch.float64), None, None
    rows = torch.randperm(x.numel() // 24)[:5]
    x.requires_grad_(True)
    weight = torch.randn(5, 24, dtype=torch.float64)

    full = block(x, cu_seqlens, longest).reshape(-1, 24)[rows]
    expected = torch.autograd.grad((full * weight).sum(), [x, *block.parameters()])
    chosen = block(x, cu_seqlens, longest, rows=rows)
    assert chosen.shape == (5, 24)
    got = torch.autograd.grad((chosen * weight).sum(), [x, *block.parameters()])
    torch.testing.assert_close(chosen, full, **EXACT)
    for grad, want in zip(got, expected, strict=True):
        torch.testing.assert_close(grad, want, **EXACT)


def test_block_rows_refuse_drop_path_in_training():
    block = Block(16, 2, drop_path=0.1, backend="reference")
    with pytest.raises(ValueError, match="rows= selection"):
        block(torch.randn(2, 5, 16), rows=torch.tensor([1, 3]))
    block.eval()
    assert block(torch.randn(2, 5, 16), rows=torch.tensor([1, 3])).shape == (2, 16)
