"""Values are checked where they enter: the public ops, the model's constructor and forward, and TrainConfig
refuse out-of-range values with a ValueError (or TypeError) naming the argument, instead of returning NaN,
inf or a silently changed run. Data-dependent checks (a mask's values) run only where they need no device
sync: the fake-tensor case below shows they stay out of traced and fake runs."""

import math

import pytest
import torch
from tiny_models import tiny_mae
from torch._subclasses.fake_tensor import FakeTensorMode
from train_helpers import TINY

from mae_fast import ops
from mae_fast.models import create_model
from mae_fast.train import TrainConfig
from mae_fast.train.runmodel import build_model

NAN, INF = float("nan"), float("inf")


def _loss_inputs(batch=2, patches=4):
    """pred [B, L, 48], imgs [B, 3, 8, 8 * L / 2] for patch 4, and a mask removing half the patches."""
    imgs = torch.randn(batch, 3, 8, 4 * patches // 2)
    pred = torch.randn(batch, patches, 48)
    mask = torch.zeros(batch, patches)
    mask[:, : patches // 2] = 1.0
    return pred, imgs, mask


# --- masked_mse_loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    ("make_mask", "message"),
    [
        (torch.zeros_like, "removes no patch"),
        (lambda m: m * 2 - 1, r"finite and >= 0.*\[-1.0, 1.0\]"),
        (lambda m: torch.where(m > 0, NAN, 0.0), "finite and >= 0"),
        (lambda m: m * INF, "finite and >= 0"),
        (lambda m: m.long() - 1, "finite and >= 0"),
    ],
    ids=["nothing_removed", "minus_one_plus_one", "nan", "inf", "negative_int"],
)
def test_loss_refuses_masks_that_are_not_non_negative_weights(backend, make_mask, message):
    pred, imgs, mask = _loss_inputs()
    with pytest.raises(ValueError, match=f"mask.*{message}|mask {message}"):
        ops.masked_mse_loss(pred, imgs, make_mask(mask), 4, backend=backend)


def test_loss_refuses_a_complex_mask():
    pred, imgs, mask = _loss_inputs()
    with pytest.raises(TypeError, match="mask must be bool, integer or floating point"):
        ops.masked_mse_loss(pred, imgs, mask.to(torch.complex64), 4, backend="torch")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_loss_still_accepts_bool_integer_and_weighted_masks(backend):
    pred, imgs, mask = _loss_inputs()
    expected = ops.masked_mse_loss(pred, imgs, mask, 4, backend="reference")
    for same in (mask.bool(), mask.long(), mask.half()):
        torch.testing.assert_close(ops.masked_mse_loss(pred, imgs, same, 4, backend=backend), expected)
    assert torch.isfinite(ops.masked_mse_loss(pred, imgs, mask * 2.5, 4, backend=backend))


@pytest.mark.parametrize(
    ("eps", "error"), [(NAN, ValueError), (INF, ValueError), (-1e-6, ValueError), ("1", TypeError)]
)
def test_loss_refuses_bad_eps(eps, error):
    pred, imgs, mask = _loss_inputs()
    with pytest.raises(error, match="eps must be"):
        ops.masked_mse_loss(pred, imgs, mask, 4, eps=eps, backend="torch")


def test_loss_refuses_a_non_bool_norm_pix():
    pred, imgs, mask = _loss_inputs()
    with pytest.raises(TypeError, match="norm_pix must be a bool"):
        ops.masked_mse_loss(pred, imgs, mask, 4, norm_pix="no", backend="torch")


def test_mask_values_are_not_read_on_fake_tensors():
    """A fake mask holds no values: the op validates its metadata only and reaches the backend."""
    pred, imgs, mask = _loss_inputs()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(t) for t in (pred, imgs, torch.zeros_like(mask))]
        loss = ops.masked_mse_loss(*fakes, 4, backend="torch")
    assert loss.shape == ()


# --- attention ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [NAN, INF, -INF, 0.0, -0.5])
def test_attention_refuses_a_scale_that_is_not_positive_and_finite(scale):
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        ops.visible_attention(q, q, q, scale=scale, backend="torch")
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        ops.qkv_attention(torch.randn(1, 3, 48), 2, scale=scale, backend="torch")


def test_attention_refuses_a_tensor_scale_and_an_empty_head():
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(TypeError, match="scale must be a Python number"):
        ops.visible_attention(q, q, q, scale=torch.tensor(0.5), backend="torch")
    empty = torch.randn(1, 3, 2, 0)
    with pytest.raises(ValueError, match="head_dim"):
        ops.visible_attention(empty, empty, empty, backend="torch")


# --- patchify, patch embedding -------------------------------------------------------------------------------


@pytest.mark.parametrize("grid_size", [4, (2.0, 2.0), (2, 2, 1), (0, 4), (True, 4)], ids=str)
def test_unpatchify_refuses_a_grid_that_is_not_a_pair_of_positive_ints(grid_size):
    with pytest.raises(ValueError, match="grid_size must be a pair"):
        ops.unpatchify(torch.randn(1, 4, 48), 4, grid_size, backend="torch")


@pytest.mark.parametrize("shape", [(1, 0, 8, 8), (1, 3, 0, 8), (1, 3, 8, 0)])
def test_patchify_refuses_images_with_an_empty_dimension(shape):
    with pytest.raises(ValueError, match="imgs must have at least one channel, row and column"):
        ops.patchify(torch.randn(shape), 4, backend="torch")


def test_patch_embed_refuses_a_weight_with_no_output_channel():
    imgs, ids = torch.randn(1, 3, 8, 8), torch.arange(4)[None]
    with pytest.raises(ValueError, match="weight .* no zero dimension"):
        ops.patch_embed_gather(imgs, ids, torch.randn(0, 3, 4, 4), backend="torch")


# --- the model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_heads=-1), "num_heads must be a positive int"),
        (dict(num_heads=0), "num_heads must be a positive int"),
        (dict(decoder_num_heads=-2), "decoder_num_heads must be a positive int"),
        (dict(depth=-1), "depth must be a non-negative int"),
        (dict(decoder_depth=1.5), "decoder_depth must be a non-negative int"),
        (dict(img_size=0), "img_size must be a positive int"),
        (dict(img_size=16.0), "img_size must be a pair"),
        (dict(img_size=(16, 16.0)), "img_size must be a pair"),
        (dict(img_size=(16, 16, 3)), "img_size must be a pair"),
        (dict(layer_norm_eps=-1.0), "layer_norm_eps must be positive and finite"),
        (dict(layer_norm_eps=NAN), "layer_norm_eps must be positive and finite"),
        (dict(embed_dim=32, num_heads=3), "embed_dim=32 must be a multiple of num_heads=3"),
        (dict(embed_dim=2, num_heads=4), "embed_dim=2 must be a multiple of num_heads=4"),
        (dict(mlp_ratio=-1.0), "mlp_ratio must be positive and finite"),
        (dict(mlp_ratio=INF), "mlp_ratio must be positive and finite"),
        (dict(mlp_ratio=0.01), "mlp_ratio=0.01 gives an MLP with no hidden unit"),
        (dict(patch_size=0), "patch_size must be a positive int"),
    ],
    ids=lambda value: str(value) if not isinstance(value, dict) else ",".join(f"{k}={v}" for k, v in value.items()),
)
def test_model_constructor_names_the_bad_argument(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_mae(**overrides)


def test_model_refuses_a_mlp_ratio_that_is_not_a_number():
    with pytest.raises(TypeError, match="mlp_ratio must be a Python number"):
        tiny_mae(mlp_ratio="4")


def test_model_refuses_imgs_of_another_dtype_outside_autocast():
    model = tiny_mae()
    for dtype in (torch.float16, torch.float64):
        with pytest.raises(ValueError, match=rf"imgs is {dtype} but the model's parameters are torch.float32"):
            model(torch.randn(2, 3, 16, 16, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the images: accepted
        loss, _, _ = model(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("mask_ratio", [0.0, 1e-17, 0.95, 0.99])
def test_model_refuses_a_mask_ratio_that_keeps_all_or_no_patch(mask_ratio):
    """16 patches: K = int(16 * (1 - r)) must lie in [1, 15], so r in (0, 0.9375]."""
    with pytest.raises(ValueError, match=r"mask_ratio must lie in \(0, 1 - 1/16\] = \(0, 0.9375\]"):
        tiny_mae()(torch.randn(2, 3, 16, 16), mask_ratio)


@pytest.mark.parametrize("mask_ratio", [1 / 16, 0.5, 0.9375])
def test_model_accepts_the_edges_of_the_mask_ratio_range(mask_ratio):
    loss, _, mask = tiny_mae()(torch.randn(2, 3, 16, 16), mask_ratio)
    assert torch.isfinite(loss) and 0 < mask.sum() < mask.numel()


def test_per_sample_ratios_may_keep_everything_in_some_images_but_not_all():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 16, 16)
    loss, _, mask = model(imgs, torch.tensor([0.0, 0.5]))
    assert torch.isfinite(loss) and mask[0].sum() == 0 and mask[1].sum() == 8
    with pytest.raises(ValueError, match="keeps all patches"):
        model(imgs, torch.tensor([0.0, 0.0]))


def test_factory_models_check_their_overrides():
    with pytest.raises(ValueError, match="depth must be a non-negative int"):
        create_model("mae_vit_tiny_patch4_32", depth=-1)


# --- TrainConfig --------------------------------------------------------------------------------------------


def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{"model_kwargs": dict(TINY), "device": "cpu", **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(lr=1e-3, min_lr=1e-2), r"min_lr=0.01 exceeds the peak learning rate 0.001 \(lr\)"),
        (dict(blr=1e-4, batch_size=256, min_lr=2e-4), r"min_lr=0.0002 exceeds .*blr \* batch_size / 256"),
        (dict(lr=NAN), "lr must be a finite number > 0 or None"),
        (dict(lr=INF), "lr must be a finite number > 0 or None"),
        (dict(lr=-1e-3), "lr must be a finite number > 0 or None"),
        (dict(lr=True), "lr must be a finite number > 0 or None"),
        (dict(blr=NAN), "blr must be a finite number >= 0"),
        (dict(blr=0.0), "blr must be > 0 when lr is None"),
        (dict(min_lr=-1.0), "min_lr must be a finite number >= 0"),
        (dict(weight_decay=INF), "weight_decay must be a finite number >= 0"),
        (dict(warmup_epochs=NAN), "warmup_epochs must be a finite number >= 0"),
        (dict(clip_grad=NAN), "clip_grad must be positive and finite"),
        (dict(clip_grad=0.0), "clip_grad must be positive and finite"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(batch_size=-8), "batch_size must be a positive int"),
        (dict(epochs=0), "epochs must be a positive int"),
        (dict(epochs=2.0), "epochs must be a positive int"),
        (dict(accum_steps=0), "accum_steps must be a positive int"),
        (dict(max_steps=0), "max_steps must be a positive int"),
        (dict(num_workers=-1), "num_workers must be a non-negative int"),
        (dict(betas=(0.9, NAN)), "betas must be two numbers in"),
        (dict(betas=(0.9,)), "betas must be two numbers in"),
        (dict(mask_ratio=NAN), r"mask_ratio must be in \[0, 1\)"),
        (dict(mask_ratio=True), r"mask_ratio must be in \[0, 1\)"),
        (dict(mask_ratio=0.0), r"mask_ratio=0.0 keeps 49 of the model's 49 patches.*\(0, 0.979592\]"),
        (dict(mask_ratio=0.99), r"mask_ratio=0.99 keeps 0 of the model's 49 patches"),
        (dict(norm_pix_loss="yes"), "norm_pix_loss must be True or False"),
        (dict(output_dir=""), "output_dir must be a non-empty path"),
        (dict(resume=""), "resume must be a checkpoint path"),
    ],
    ids=lambda value: str(value) if not isinstance(value, dict) else ",".join(f"{k}={v}" for k, v in value.items()),
)
def test_config_names_the_bad_field_and_its_range(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides).validate()


def test_config_accepts_min_lr_equal_to_the_peak():
    config = _config(lr=1e-3, min_lr=1e-3).validate()
    assert config.base_lr() == config.min_lr


def test_config_refuses_in_chans_that_the_data_would_replace():
    """Fashion-MNIST yields 1-channel images: in_chans=7 was silently replaced by 1 before."""
    with pytest.raises(ValueError, match=r"model_kwargs\['in_chans'\]=7 conflicts .*data='fashion-mnist' yields 1"):
        _config(model_kwargs={**TINY, "in_chans": 7}).validate()
    with pytest.raises(ValueError, match=r"model_kwargs\['in_chans'\]=1 conflicts .*data='synthetic' yields 3"):
        _config(data="synthetic", model_kwargs={**TINY, "in_chans": 1}).validate()
    config = _config(model_kwargs={**TINY, "in_chans": 1}).validate()  # the data's own count is fine
    assert build_model(config, torch.device("cpu")).in_chans == 1


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(model_kwargs={**TINY, "img_size": 32}), "img_size"),  # fashion-mnist runs at 28 px
        (dict(data="synthetic", img_size=32, model_kwargs={**TINY, "img_size": 64}), "img_size"),
        (dict(model_kwargs={**TINY, "norm_pix_loss": False}), "norm_pix_loss"),
        (dict(model_kwargs={**TINY, "backend": "reference"}), "backend"),
    ],
    ids=["img_size_fashion_mnist", "img_size_field", "norm_pix_loss", "backend"],
)
def test_config_refuses_model_kwargs_that_a_field_overrides(overrides, key):
    with pytest.raises(ValueError, match=rf"model_kwargs\['{key}'\].*set the {key} field instead"):
        _config(**overrides).validate()


def test_config_builds_the_model_on_meta_to_check_model_kwargs():
    with pytest.raises(ValueError, match="model='mae_vit_tiny_patch4_32' cannot be built.*num_heads must be"):
        _config(model_kwargs={**TINY, "num_heads": -1}).validate()
    with pytest.raises(ValueError, match="cannot be built.*unexpected keyword argument 'depht'"):
        _config(model_kwargs={**TINY, "depht": 2}).validate()
    with pytest.raises(ValueError, match=r"img_size \(28, 28\) must be divisible by patch_size=16"):
        _config(model="mae_vit_base_patch16", model_kwargs={}).validate()
    assert math.isclose(_config(data="synthetic", img_size=32).validate().base_lr(), 1.5e-4 * 64 / 256)
