"""MaskedAutoencoderViT: official layout, parity with the release's formulation, gradients, bad input."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_mae

from mae_fast import models
from mae_fast.models import create_model, list_models

OFFICIAL = {
    "mae_vit_base_patch16": dict(patch=16, dim=768, depth=12, heads=12),
    "mae_vit_large_patch16": dict(patch=16, dim=1024, depth=24, heads=16),
    "mae_vit_huge_patch14": dict(patch=14, dim=1280, depth=32, heads=16),
}


def _expected_shapes(patch, dim, depth, num_patches=None, chans=3, dec=512, dec_depth=8):
    length = num_patches if num_patches is not None else (224 // patch) ** 2
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, length + 1, dim),
        "mask_token": (1, 1, dec),
        "decoder_pos_embed": (1, length + 1, dec),
        "patch_embed.proj.weight": (dim, chans, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "decoder_embed.weight": (dec, dim),
        "decoder_embed.bias": (dec,),
        "decoder_norm.weight": (dec,),
        "decoder_norm.bias": (dec,),
        "decoder_pred.weight": (patch * patch * chans, dec),
        "decoder_pred.bias": (patch * patch * chans,),
    }
    for prefix, count, width in (("blocks", depth, dim), ("decoder_blocks", dec_depth, dec)):
        for i in range(count):
            block = {
                "norm1.weight": (width,),
                "norm1.bias": (width,),
                "attn.qkv.weight": (3 * width, width),
                "attn.qkv.bias": (3 * width,),
                "attn.proj.weight": (width, width),
                "attn.proj.bias": (width,),
                "norm2.weight": (width,),
                "norm2.bias": (width,),
                "mlp.fc1.weight": (4 * width, width),
                "mlp.fc1.bias": (4 * width,),
                "mlp.fc2.weight": (width, 4 * width),
                "mlp.fc2.bias": (width,),
            }
            shapes.update({f"{prefix}.{i}.{key}": shape for key, shape in block.items()})
    return shapes


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_configs_have_the_release_state_dict(name):
    with torch.device("meta"):
        model = create_model(name)
    cfg = OFFICIAL[name]
    expected = _expected_shapes(cfg["patch"], cfg["dim"], cfg["depth"])
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert got == expected
    assert model.blocks[0].attn.num_heads == cfg["heads"]
    assert model.decoder_blocks[0].attn.num_heads == 16 and model.decoder_blocks[0].attn.head_dim == 32
    assert model.blocks[0].norm1.eps == 1e-6
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_model_registry():
    names = list_models()
    assert set(OFFICIAL) <= set(names) and "mae_vit_tiny_patch4_32" in names and "mae_vit_tiny_patch16" in names
    assert isinstance(models.mae_vit_tiny_patch4_32(), models.MaskedAutoencoderViT)
    with pytest.raises(ValueError, match="unknown model 'vit_nope'"):
        create_model("vit_nope")


def _tiny(**kwargs):
    """The suite's tiny MAE with 4 heads and a 2-block decoder, on the default backend, in float64."""
    return tiny_mae(**{"num_heads": 4, "decoder_depth": 2, "backend": None, **kwargs}).double()


def _release_block(block, x):
    """timm's ViT block as the release runs it, written out: qkv split (3, heads, head_dim), softmax."""
    b, n, dim = x.shape
    heads = block.attn.num_heads
    h = F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    qkv = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).reshape(b, n, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, dim)
    x = x + F.linear(out, block.attn.proj.weight, block.attn.proj.bias)
    h = F.layer_norm(x, (dim,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    h = F.linear(
        F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight, block.mlp.fc2.bias
    )
    return x + h


def _release_forward(model, imgs, mask_ratio, noise):
    """The official formulation (conv on all patches, argsort masking, cat + gather decoder input)."""
    p = model.patch_size
    x = F.conv2d(imgs, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    x = x + model.pos_embed[:, 1:, :]
    n, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(n, length, dtype=imgs.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (model.cls_token + model.pos_embed[:, :1, :]).expand(n, -1, -1)
    x = torch.cat((cls, x), dim=1)
    for block in model.blocks:
        x = _release_block(block, x)
    x = model.norm(x)
    x = model.decoder_embed(x)
    mask_tokens = model.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + model.decoder_pos_embed
    for block in model.decoder_blocks:
        x = _release_block(block, x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:, :]
    gh, gw = model.grid_size
    c = imgs.shape[1]
    target = imgs.reshape(n, c, gh, p, gw, p)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(n, gh * gw, p * p * c)
    if model.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("img_size", [16, (16, 12)])
def test_parity_with_release_formulation(norm_pix, img_size):
    model = _tiny(img_size=img_size, norm_pix_loss=norm_pix).float()
    gh, gw = model.grid_size
    imgs = torch.randn(3, 3, gh * 4, gw * 4)
    noise = torch.rand(3, gh * gw)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    with torch.no_grad():
        ref_loss, ref_pred, ref_mask = _release_forward(model, imgs, 0.75, noise)
    torch.testing.assert_close(mask, ref_mask, rtol=0, atol=0)
    assert ((pred - ref_pred).norm() / ref_pred.norm()).item() < 1e-6  # relative difference of the whole tensor
    assert abs(loss.item() - ref_loss.item()) < 1e-6 * abs(ref_loss.item())


def test_every_parameter_but_the_position_tables_gets_a_gradient():
    model = _tiny(norm_pix_loss=True)
    loss, _, _ = model(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    loss.backward()
    for name, param in model.named_parameters():
        if name in ("pos_embed", "decoder_pos_embed"):
            assert param.grad is None
        else:
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name


def test_initialisation_follows_the_release():
    model = _tiny(embed_dim=64, num_heads=4)
    from mae_fast.reference import sincos_pos_embed_2d

    torch.testing.assert_close(model.pos_embed[0].float(), sincos_pos_embed_2d(64, (4, 4), cls_token=True))
    torch.testing.assert_close(model.decoder_pos_embed[0].float(), sincos_pos_embed_2d(16, (4, 4), cls_token=True))
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and torch.all(model.norm.weight == 1)
    bound = (6 / (64 + 3 * 16)) ** 0.5  # xavier_uniform on the [D, C*p*p] view
    assert model.patch_embed.proj.weight.abs().max() <= bound
    assert 0.005 < model.cls_token.std() < 0.05


def test_encoder_sees_only_visible_tokens():
    model = _tiny()
    latent, mask, ids_restore = model.forward_encoder(torch.randn(2, 3, 16, 16, dtype=torch.float64), 0.75)
    assert latent.shape == (2, 1 + 4, 32) and mask.shape == (2, 16) and ids_restore.shape == (2, 16)
    assert model.forward_decoder(latent, ids_restore).shape == (2, 16, 48)


def test_patchify_methods_round_trip_non_square():
    model = _tiny(img_size=(8, 20))
    imgs = torch.randn(2, 3, 8, 20, dtype=torch.float64)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 10, 48)
    torch.testing.assert_close(model.unpatchify(patches), imgs, rtol=0, atol=0)


def test_random_masking_method_keeps_release_signature():
    model = _tiny()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    x_masked, mask, ids_restore = model.random_masking(x, 0.5)
    assert x_masked.shape == (2, 8, 32) and mask.sum().item() == 16 and ids_restore.shape == (2, 16)


@pytest.mark.parametrize(
    "imgs,kwargs,match",
    [
        (torch.randn(2, 1, 16, 16), {}, "3 channels"),
        (torch.randn(2, 3, 16, 20), {}, "16x16"),
        (torch.randn(3, 16, 16), {}, "4 dimensions"),
        (torch.randn(2, 3, 16, 16), {"mask_ratio": 1.0}, "mask_ratio"),
        (torch.randn(2, 3, 16, 16), {"mask_ratio": -0.1}, "mask_ratio"),
        (torch.randn(2, 3, 16, 16), {"mask_ratio": 0.99}, "keeps no patch"),
        (torch.randn(2, 3, 16, 16), {"noise": torch.rand(2, 15)}, "noise must have shape"),
        (torch.randint(0, 9, (2, 3, 16, 16)), {}, "dtype"),
    ],
)
def test_bad_input_is_named(imgs, kwargs, match):
    model = _tiny().float()
    with pytest.raises(ValueError, match=match):
        model(imgs, **kwargs)


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        models.MaskedAutoencoderViT(img_size=30, patch_size=4, embed_dim=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="backend"):
        _tiny(backend="fast")
    with pytest.raises(ValueError, match="num_heads"):
        _tiny(num_heads=5)


def test_same_noise_same_mask_and_loss():
    model = _tiny()
    imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    noise = torch.rand(2, 16)
    first = model(imgs, noise=noise)
    second = model(imgs, noise=noise)
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)
    torch.testing.assert_close(first[2], second[2], rtol=0, atol=0)


def test_encode_gives_features_of_every_patch():
    model = _tiny()
    feats = model.encode(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert feats.shape == (2, 17, 32)
