"""model(imgs, mask_ratio=t) with one ratio per image: the encoder runs on packed variable-length sequences.

Acceptance: the batch equals running each image alone with its own ratio and the same noise (pred, mask,
and the loss, which stays sum(per_patch * mask) / sum(mask) over the whole batch), gradients included.
"""

import pytest
import torch
from tiny_models import tiny_mae

RATIOS = [0.75, 0.5, 0.9, 0.0]  # keeps 4, 8, 1 and all 16 patches
TOL = dict(atol=1e-5, rtol=1e-5)


def _model(device, backend="reference"):
    return tiny_mae(img_size=32, patch_size=8, decoder_embed_dim=32, norm_pix_loss=True, backend=backend).to(device)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _per_sample_and_alone(model, imgs, ratios, noise):
    model.zero_grad()
    loss, pred, mask = model(imgs, mask_ratio=ratios, noise=noise)
    loss.backward()
    batch_grads = _grads(model)

    model.zero_grad()
    removed = torch.tensor([16 - int(16 * (1 - r)) for r in ratios.tolist()], dtype=torch.float32)  # L - K_b
    total = float(removed.sum())
    alone = []
    for b, ratio in enumerate(ratios.tolist()):
        if removed[b]:
            loss_b, pred_b, mask_b = model(imgs[b : b + 1], mask_ratio=ratio, noise=noise[b : b + 1])
            (loss_b * float(removed[b]) / total).backward()  # the batch loss is the mask-weighted mean
        else:  # nothing removed: no loss of its own (model() refuses the ratio), weight 0 in the batch
            latent, mask_b, ids_restore = model.forward_encoder(imgs[b : b + 1], ratio, noise[b : b + 1])
            loss_b, pred_b = torch.tensor(float("nan")), model.forward_decoder(latent, ids_restore)
        alone.append((loss_b.detach(), pred_b.detach(), mask_b))
    return (loss.detach(), pred.detach(), mask, batch_grads), alone, _grads(model), removed


@pytest.mark.parametrize("attention_backend", ["reference", "triton"])
def test_per_sample_ratios_equal_each_image_alone(device, attention_backend):
    model = _model(device)
    for module in model.modules():
        if module.__class__.__name__ == "Attention":
            module.backend = attention_backend
    imgs = torch.randn(len(RATIOS), 3, 32, 32, device=device)
    noise = torch.rand(len(RATIOS), 16, device=device)
    ratios = torch.tensor(RATIOS, device=device)
    (loss, pred, mask, grads), alone, alone_grads, removed = _per_sample_and_alone(model, imgs, ratios, noise)

    assert pred.shape == (4, 16, 8 * 8 * 3) and mask.shape == (4, 16)
    assert mask.sum(dim=1).tolist() == removed.tolist()
    for b, (_, pred_b, mask_b) in enumerate(alone):
        torch.testing.assert_close(mask[b : b + 1], mask_b, atol=0, rtol=0)
        torch.testing.assert_close(pred[b : b + 1], pred_b, **TOL)
    expected_loss = sum(loss_b * float(removed[b]) for b, (loss_b, _, _) in enumerate(alone) if removed[b]) / float(
        removed.sum()
    )
    torch.testing.assert_close(loss, expected_loss, **TOL)
    assert set(grads) == set(alone_grads)
    for name, grad in alone_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_equal_ratios_match_the_scalar_path(device):
    model = _model(device)
    imgs = torch.randn(3, 3, 32, 32, device=device)
    noise = torch.rand(3, 16, device=device)
    scalar = model(imgs, mask_ratio=0.75, noise=noise)
    per_sample = model(imgs, mask_ratio=torch.full((3,), 0.75, device=device), noise=noise)
    for a, b in zip(scalar, per_sample, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_per_sample_ratios_are_validated(device):
    model = _model(device)
    imgs = torch.randn(2, 3, 32, 32, device=device)
    with pytest.raises(ValueError, match="shape \\[2\\]"):
        model(imgs, mask_ratio=torch.tensor([0.5, 0.5, 0.5], device=device))
    with pytest.raises(ValueError, match="float tensor"):
        model(imgs, mask_ratio=torch.tensor([0, 0], device=device))
    with pytest.raises(ValueError, match="mask_ratio must be a number in \\[0, 1\\)"):
        model(imgs, mask_ratio=torch.tensor([0.5, 1.0], device=device))
    with pytest.raises(ValueError, match="keeps no patch"):
        model(imgs, mask_ratio=torch.tensor([0.5, 0.99], device=device))
    with pytest.raises(ValueError, match="noise must have shape"):
        model(imgs, mask_ratio=torch.tensor([0.5, 0.7], device=device), noise=torch.rand(2, 15, device=device))
