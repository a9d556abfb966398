"""The whole model on the Triton backend equals the reference backend (interpreter on the CPU)."""

import pytest
import torch
from tiny_models import tiny_mae


def _pair(norm_pix: bool, img_size):
    reference = tiny_mae(img_size=img_size, norm_pix_loss=norm_pix, backend="reference")
    triton = tiny_mae(img_size=img_size, norm_pix_loss=norm_pix, backend="triton")
    triton.load_state_dict(reference.state_dict())
    return reference, triton


@pytest.mark.parametrize("norm_pix,img_size", [(True, 16), (False, (12, 20))])
def test_triton_backend_matches_reference_forward_and_every_gradient(norm_pix, img_size, device):
    reference, triton = _pair(norm_pix, img_size)
    reference.to(device)
    triton.to(device)
    gh, gw = reference.grid_size
    imgs = torch.randn(3, 3, gh * 4, gw * 4, device=device)
    noise = torch.rand(3, gh * gw, device=device)
    outputs = {}
    for name, model in (("reference", reference), ("triton", triton)):
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
        loss.backward()
        outputs[name] = (loss.detach(), pred.detach(), mask, {n: p.grad for n, p in model.named_parameters()})
    ref, tri = outputs["reference"], outputs["triton"]
    torch.testing.assert_close(tri[2], ref[2], rtol=0, atol=0)
    torch.testing.assert_close(tri[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri[1], ref[1], rtol=1e-4, atol=1e-5)
    assert set(tri[3]) == set(ref[3])
    for name, grad in ref[3].items():
        if grad is None:
            assert tri[3][name] is None, name
        else:
            torch.testing.assert_close(tri[3][name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_triton_model_patchify_methods(device):
    _, triton = _pair(True, 16)
    imgs = torch.randn(2, 3, 16, 16, device=device)
    patches = triton.to(device).patchify(imgs)
    torch.testing.assert_close(triton.unpatchify(patches), imgs, rtol=0, atol=0)
