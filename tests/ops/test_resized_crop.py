"""resized_crop on every backend against the reference (torchvision's uint8 bicubic + antialias, rounded to
uint8 levels), and against the exact float64 interpolant for the float backends; its refusals; the Triton
kernel's ahead-of-time builds.

The acceptance: within one uint8 level of the reference before normalisation, on 1-pixel crops, full-image
crops, extreme aspect ratios, upscaling and downscaling, C = 1 and 3, flip on and off, mean / std, bf16.
Images stay small (<= 40 px): the Triton interpreter runs every tap of every row in Python.
"""

from __future__ import annotations

import pytest
import torch
from cases import check_aot_builds, opcheck, register_aot_jobs
from mae_fast.kernels import patchify_gather as gather_kernel
from mae_fast.kernels import resized_crop as crop_kernel

from mae_fast import dispatch, ops
from mae_fast.backends.reference.resized_crop import resized_crop_spec
from mae_fast.ops.resized_crop import pack_images

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# (image shapes [C, H, W], boxes (top, left, height, width), output size)
CASES = {
    "one_pixel_crops_upscaled": ([(3, 9, 11), (3, 1, 1)], [(4, 5, 1, 1), (0, 0, 1, 1)], (5, 7)),
    "full_image_downscaled": ([(1, 24, 17), (1, 20, 20)], [(0, 0, 24, 17), (0, 0, 20, 20)], (8, 12)),
    "full_image_same_size": ([(3, 13, 10)], [(0, 0, 13, 10)], (13, 10)),
    "extreme_aspect_ratios": ([(1, 6, 40), (1, 33, 4)], [(2, 3, 2, 30), (0, 2, 33, 1)], (12, 6)),
    "up_and_down": ([(3, 16, 21), (3, 24, 20)], [(2, 3, 7, 9), (0, 0, 24, 20)], (20, 7)),
    "to_one_pixel": ([(3, 8, 9), (3, 5, 5)], [(1, 2, 6, 5), (2, 2, 1, 1)], (1, 1)),
    "odd_sizes_mixed": ([(1, 17, 29), (1, 31, 13), (1, 3, 3)], [(5, 1, 11, 27), (3, 0, 28, 13), (1, 1, 2, 2)], (9, 11)),
    # outputs over 32 x 32: several Triton tiles per image, the last ones partial
    "several_tiles": ([(1, 40, 40), (1, 9, 7)], [(0, 0, 40, 40), (1, 1, 8, 6)], (34, 33)),
}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """The kernel's output starts as NaN: an element it does not write fails every comparison."""
    monkeypatch.setenv(gather_kernel.POISON_ENV, "1")


def random_images(shapes, device) -> list[torch.Tensor]:
    return [torch.randint(0, 256, shape, dtype=torch.uint8, device=device) for shape in shapes]


def levels_of(out: torch.Tensor, mean, std) -> torch.Tensor:
    """The output back in uint8 levels (float64): undo the normalisation and the / 255."""
    values = out.double()
    if mean is not None:
        std_t = torch.tensor(std, dtype=torch.float64, device=out.device)[:, None, None]
        mean_t = torch.tensor(mean, dtype=torch.float64, device=out.device)[:, None, None]
        values = values * std_t + mean_t
    return values * 255


def level_tolerance(out: torch.Tensor, std) -> float:
    """One level, plus half an ulp of the output dtype at the largest output, in levels."""
    if out.dtype == torch.float32:
        return 1.0
    half_ulp = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}[out.dtype]
    return 1.0 + 255 * max(std or (1.0,)) * half_ulp * out.double().abs().max().item()


@pytest.mark.backends("reference", "torch", "triton")
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("normalise", [False, True], ids=["to_unit", "mean_std"])
def test_within_one_level_of_the_reference(backend, case, normalise):
    shapes, boxes, size = CASES[case]
    images = random_images(shapes, backend.device)
    boxes = torch.tensor(boxes)
    flip = torch.rand(len(images)) < 0.5
    mean, std = (MEAN[: shapes[0][0]], STD[: shapes[0][0]]) if normalise else (None, None)
    out = ops.resized_crop(images, boxes, size, flip, mean, std, backend=backend.name)
    expected = ops.resized_crop(images, boxes, size, flip, mean, std, backend="reference")
    assert out.shape == (len(images), shapes[0][0], *size) and out.dtype == torch.float32
    error = (levels_of(out, mean, std) - levels_of(expected, mean, std)).abs().max().item()
    assert error <= 1.0, f"{case}: {error:.3f} levels from the reference"
    if not normalise:
        assert 0.0 <= out.min().item() and out.max().item() <= 1.0
    if backend.name != "reference" and not normalise:
        # Not rounded to levels, the float32 backends equal the float64 interpolant to ~1e-3 levels (a wrong
        # tap or a mirrored column would be off by many). The bound holds for these small images: fp32 source
        # positions carry a rounding error that grows with the image (see the GPU test).
        exact = resized_crop_spec(images, boxes, size, flip, None, None, torch.float64, torch.float64, rounded=False)
        error = ((out.double() - exact).abs().max() * 255).item()
        assert error <= 2e-3, f"{case}: {error:.2e} levels from the float64 interpolant"


@pytest.mark.backends("torch", "triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_outputs(backend, dtype):
    """bf16 / fp16 outputs (the model's autocast input): within a level plus the dtype's rounding."""
    shapes, boxes, size = CASES["up_and_down"]
    images = random_images(shapes, backend.device)
    boxes, flip = torch.tensor(boxes), torch.tensor([True, False])
    out = ops.resized_crop(images, boxes, size, flip, MEAN, STD, dtype=dtype, backend=backend.name)
    expected = ops.resized_crop(images, boxes, size, flip, MEAN, STD, backend="reference")
    assert out.dtype == dtype
    error = (levels_of(out, MEAN, STD) - levels_of(expected, MEAN, STD)).abs().max().item()
    assert error <= level_tolerance(out, STD), f"{dtype}: {error:.3f} levels from the reference"


@pytest.mark.backends("torch", "triton")
def test_flip_mirrors_the_columns(backend):
    images = random_images([(3, 12, 15), (3, 12, 15)], backend.device)
    boxes = torch.tensor([[1, 2, 9, 11], [1, 2, 9, 11]])
    images[1] = images[0].clone()
    out = ops.resized_crop(images, boxes, (6, 10), torch.tensor([False, True]), backend=backend.name)
    torch.testing.assert_close(out[1], out[0].flip(-1), rtol=0, atol=1e-6)


@pytest.mark.backends("reference", "torch", "triton")
def test_strided_images_and_int32_boxes(backend):
    """Images as a decoder may hand them over (HWC memory viewed as CHW, a crop of a larger buffer), int32
    boxes and a strided flip give what contiguous images, int64 boxes and a contiguous flip give."""
    hwc = torch.randint(0, 256, (10, 13, 3), dtype=torch.uint8, device=backend.device)
    big = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8, device=backend.device)
    images = [hwc.permute(2, 0, 1), big[:, 3:13, 5:18]]
    assert not any(image.is_contiguous() for image in images)
    boxes = torch.tensor([[1, 2, 8, 11], [0, 0, 10, 13]], dtype=torch.int32)
    flip = torch.tensor([True, True, False, False])[::2]  # strided: True, False
    out = ops.resized_crop(images, boxes, (5, 6), flip, MEAN, STD, backend=backend.name)
    dense = [image.contiguous() for image in images]
    expected = ops.resized_crop(dense, boxes.long(), (5, 6), flip.contiguous(), MEAN, STD, backend=backend.name)
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_on_imagenet_sizes_gpu(dtype):
    """The training shapes, too slow for the interpreter: 48 images of 298-504 px, RandomResizedCrop boxes
    (and one 1000-px crop downscaled 15x), to 224 x 224 with flips and mean/std, against the reference
    (one level) and, in float32, the float64 interpolant computed on the CPU."""
    from mae_fast.train.data import random_resized_crop_box

    generator = torch.Generator().manual_seed(0)
    sides = torch.randint(298, 505, (47, 2), generator=generator).tolist() + [[1000, 1200]]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device="cuda") for h, w in sides]
    boxes = [random_resized_crop_box(h, w, generator) for h, w in sides[:-1]] + [(0, 100, 1000, 1000)]
    boxes, flip = torch.tensor(boxes), torch.rand(len(images)) < 0.5
    out = ops.resized_crop(images, boxes, 224, flip, MEAN, STD, dtype=dtype, backend="triton")
    expected = ops.resized_crop(images, boxes, 224, flip, MEAN, STD, backend="reference")
    error = (levels_of(out, MEAN, STD) - levels_of(expected, MEAN, STD)).abs().max().item()
    assert error <= level_tolerance(out, STD), f"{error:.3f} levels from the reference"
    if dtype == torch.float32:
        on_cpu = [image.cpu() for image in images]
        exact = resized_crop_spec(on_cpu, boxes, (224, 224), flip, None, None, torch.float64, torch.float64, False)
        unit = ops.resized_crop(images, boxes, 224, flip, backend="triton").cpu()
        # fp32 source positions near 1000 px are off by up to ~6e-5 px: on random pixels (edges of 255
        # levels per pixel) that is ~1e-2 levels; the torch backend measured 6e-3 on these shapes
        assert ((unit.double() - exact).abs().max() * 255).item() <= 2e-2


def test_reference_is_torchvision():
    """The reference is torchvision's resized_crop of the float32 image (bicubic, antialias), clamped and rounded
    as torchvision does for uint8 images on a GPU, then flipped and normalised."""
    functional = pytest.importorskip("torchvision.transforms.v2.functional")
    for case in ("up_and_down", "extreme_aspect_ratios", "full_image_same_size", "one_pixel_crops_upscaled"):
        shapes, boxes, size = CASES[case]
        images = random_images(shapes, "cpu")
        flip = torch.rand(len(images)) < 0.5
        out = ops.resized_crop(images, torch.tensor(boxes), size, flip, MEAN[: shapes[0][0]], STD[: shapes[0][0]])
        mine = ops.resized_crop(images, torch.tensor(boxes), size, flip, backend="reference", dtype=torch.float64)
        for index, (image, box) in enumerate(zip(images, boxes, strict=True)):
            resized = functional.resized_crop(
                image.float(), *box, list(size), functional.InterpolationMode.BICUBIC, antialias=True
            )
            levels = resized.clamp(0, 255).round().double()
            levels = levels.flip(-1) if flip[index] else levels
            torch.testing.assert_close(mine[index] * 255, levels, rtol=0, atol=1e-4, msg=case)
        assert out.dtype == torch.float32  # "auto" on the CPU: the torch backend


def test_packing_is_cu_seqlens_like():
    images = random_images([(3, 5, 7), (3, 2, 3), (3, 4, 1)], "cpu")
    packed = pack_images(images)
    assert packed.offsets.tolist() == [0, 105, 123, 135]
    assert packed.shapes.tolist() == [[5, 7], [2, 3], [4, 1]]
    for index, image in enumerate(images):
        start, end = packed.offsets[index : index + 2].tolist()
        assert torch.equal(packed.pixels[start:end].view(image.shape), image)


def test_bad_input_is_a_clear_error():
    images = random_images([(3, 10, 12), (3, 8, 9)], "cpu")
    boxes = torch.tensor([[0, 0, 10, 12], [1, 1, 5, 5]])

    def call(images=images, boxes=boxes, size=4, **kwargs):
        return ops.resized_crop(images, boxes, size, backend="reference", **kwargs)

    cases = [
        (lambda: call(boxes=torch.tensor([[0, 0, 10, 12], [4, 1, 5, 5]])), r"boxes\[1\] .* not inside images\[1\]"),
        (lambda: call(boxes=torch.tensor([[-1, 0, 5, 5], [1, 1, 5, 5]])), r"boxes\[0\] .* not inside images\[0\]"),
        (lambda: call(boxes=torch.tensor([[0, 0, 10, 13], [1, 1, 5, 5]])), r"boxes\[0\] .* width 12"),
        (lambda: call(boxes=torch.tensor([[0, 0, 0, 5], [1, 1, 5, 5]])), r"boxes\[0\] has height 0"),
        (lambda: call(boxes=torch.tensor([[0, 0, 5, 5], [1, 1, 5, -2]])), r"boxes\[1\] has height 5, width -2"),
        (lambda: call(boxes=boxes.float()), "boxes must be int64 or int32"),
        (lambda: call(boxes=boxes[:1]), r"boxes must have shape \(2, 4\)"),
        (lambda: call(boxes=boxes.to("meta")), "boxes must be on the CPU or on the images' device"),
        (lambda: call(size=0), "size must be a positive int"),
        (lambda: call(size=(4, -1)), "size must be a positive int"),
        (lambda: call(size=(4, 5, 6)), "size must be a positive int"),
        (lambda: call(size=2.5), "size must be a positive int"),
        (lambda: call(images=[images[0].float(), images[1]]), r"images\[0\] must be uint8"),
        (lambda: call(images=[images[0], images[1][:1]]), r"images\[1\] has 1 channels but images\[0\] has 3"),
        (lambda: call(images=[images[0], images[1][0]]), r"images\[1\] must have 3 dimensions"),
        (lambda: call(images=[images[0]]), r"boxes must have shape \(1, 4\)"),
        (lambda: call(images=[]), "images must hold at least one image"),
        (lambda: call(images=[images[0], images[1].to("meta")]), "tensors must be on one device"),
        (lambda: call(flip=torch.tensor([True])), r"flip must have shape \(2,\)"),
        (lambda: call(flip=torch.tensor([1, 0])), "flip must have dtype"),
        (lambda: call(mean=MEAN), "mean and std must be given together"),
        (lambda: call(mean=MEAN[:2], std=STD[:2]), "mean must be a sequence of 3 numbers"),
        (lambda: call(mean=MEAN, std=(0.2, 0.0, 0.2)), "std values must be positive"),
        (lambda: call(dtype=torch.int32), "dtype must be one of"),
    ]
    for bad_call, message in cases:
        with pytest.raises(ValueError, match=message):
            bad_call()
    with pytest.raises(TypeError, match="images must be a list or tuple"):
        call(images=torch.stack(images[:1] * 2))


def test_support_and_refusals():
    """No backend differentiates an input (uint8 images); the Triton kernel leaves float64 to the others."""
    images = random_images([(1, 6, 6)], "cpu")
    boxes = torch.tensor([[0, 0, 6, 6]])
    for backend in ("reference", "torch", "triton"):
        assert dispatch.support("resized_crop", backend).grad_inputs == ()
    reasons = dispatch.explain("resized_crop", images, boxes, (3, 3), None, None, None, torch.float64)
    assert reasons["cuda"] == "not implemented for this op"
    if reasons["triton"] is None or "compute dtype" in reasons["triton"]:
        with pytest.raises(dispatch.BackendError, match="the compute dtype is float64; the Triton resized_crop"):
            ops.resized_crop(images, boxes, 3, dtype=torch.float64, backend="triton")
    out = ops.resized_crop(images, boxes, 3, dtype=torch.float64, backend="torch")
    assert out.dtype == torch.float64


@pytest.mark.primitives("resized_crop")
def test_opcheck(ns):
    images = random_images([(1, 5, 6), (1, 3, 4)], ns.device)
    packed = pack_images(images)
    boxes = torch.tensor([[0, 1, 4, 5], [1, 1, 2, 2]], device=ns.device)
    flip = torch.tensor([True, False], device=ns.device)
    scale_shift = torch.tensor([[1 / 255, 0.0]], device=ns.device)
    args = (packed.pixels, packed.offsets, packed.shapes, boxes, flip, scale_shift, 1, 3, 4, torch.float32)
    opcheck(ns, {"resized_crop": ("resized_crop", args)}, "resized_crop")


# --- the Triton kernel: ahead-of-time builds for the GPU ------------------------------------------------


def _aot_job(dtype: str, arch: int, has_flip: bool = True) -> dict:
    signature = {
        "pixels_ptr": "*u8",
        "offsets_ptr": "*i64",
        "shapes_ptr": "*i32",
        "boxes_ptr": "*i64",
        "flip_ptr": "*u8",
        "scale_shift_ptr": "*fp32",
        "out_ptr": f"*{dtype}",
    }
    block_y, block_x, num_warps = crop_kernel.launch_config(224, 224)
    constexprs = {"C": 3, "OUT_H": 224, "OUT_W": 224, "HAS_FLIP": has_flip, "BLOCK_Y": block_y, "BLOCK_X": block_x}
    label = f"resized_crop {dtype} sm_{arch}{'' if has_flip else ' no flip'}"
    return dict(
        label=label, module="mae_fast.kernels.resized_crop", kernel="_resized_crop_kernel",
        signature=signature, constexprs=constexprs, arch=arch, num_warps=num_warps, num_stages=crop_kernel.NUM_STAGES,
    )  # fmt: skip


register_aot_jobs(
    "resized_crop", [_aot_job("bf16", 90), _aot_job("fp32", 90, has_flip=False), _aot_job("fp32", 80)]
)


def test_triton_kernel_compiles_for_sm90_and_sm80_without_spills():
    check_aot_builds("resized_crop")
