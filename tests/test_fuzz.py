"""Property-based fuzzing of every public op, the model's constructor and TrainConfig (hypothesis).

Each op test is parametrized by a fault: None, or one change to one argument (NaN, inf, zero, negative or
wrong-typed scalars; masks, ids and noise with bad values; mismatched shapes and dtypes). Hypothesis draws
the rest (shapes, dtypes, values, optional arguments). Without a fault the torch backend's result must equal
the reference backend's within the dtype's tolerance; with one the op must raise a ValueError or TypeError
that names the argument the fault went into. The ops run on the CPU, where every value check is on. The
model and config tests draw several arguments at once: a refusal must name one of them, and what is accepted
must be consistent. The runs are derandomized (the same examples every time), so CI is reproducible.
"""

import math
import re

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mae_fast import ops, reference
from mae_fast.models import create_model
from mae_fast.train import TrainConfig

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True)
VALID_EXAMPLES, FAULT_EXAMPLES = 40, 6
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOLERANCE = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
NAN, INF = float("nan"), float("inf")

dtypes = st.sampled_from(FLOATS)
seeds = st.integers(0, 2**16)


def _tensor(shape, dtype, seed, magnitude=1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * magnitude).to(dtype)


def _permutations(batch, length, seed, dtype=torch.int64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=generator) for _ in range(batch)]).to(dtype)


def _assert_names_an_argument(error: Exception, names: set[str]) -> None:
    message = str(error)
    assert any(re.search(rf"\b{re.escape(name)}\b", message) for name in names), (
        f"{type(error).__name__} names none of {sorted(names)}: {message}"
    )


def _assert_same(actual, expected, dtype) -> None:
    """Equal within the tolerance of ``dtype`` (None: bit for bit), dtypes and shapes included."""
    if isinstance(expected, tuple):
        for a, e in zip(actual, expected, strict=True):
            _assert_same(a, e, dtype)
        return
    tolerance = TOLERANCE[dtype] if dtype is not None else dict(rtol=0, atol=0)
    torch.testing.assert_close(actual, expected, equal_nan=True, check_dtype=True, **tolerance)


def check_op(op, args: tuple, kwargs: dict, dtype, fault: str | None, blamed: str) -> None:
    """Without a fault: the torch backend's result equals the reference's (within ``dtype``'s tolerance, or
    exactly for None). With one: a ValueError or TypeError that names ``blamed``, the faulted argument."""
    try:
        actual = op(*args, **kwargs, backend="torch")
    except (ValueError, TypeError) as error:
        assert fault is not None, f"{op.__name__} refused valid inputs: {error}"
        _assert_names_an_argument(error, {blamed})
        event(f"{op.__name__}: refused {fault}")
        return
    assert fault is None, f"{op.__name__} accepted the fault {fault!r} ({blamed})"
    event(f"{op.__name__}: compared with the reference")
    _assert_same(actual, op(*args, **kwargs, backend="reference"), dtype)


def fuzz(fault: str | None, examples: int | None = None):
    """Run the decorated body(data) now, as a hypothesis test: VALID_EXAMPLES draws without a fault (each
    compared with the reference), FAULT_EXAMPLES with one."""
    count = examples or (VALID_EXAMPLES if fault is None else FAULT_EXAMPLES)

    def run(body):
        settings(FUZZ, max_examples=count)(given(st.data())(body))()

    return run


def _grid(draw, fault=None) -> tuple[int, int, int]:
    """(patch_size, gh, gw) of a small valid image grid; p >= 2 where the fault is one value or column short."""
    smallest = 2 if fault in ("uneven", "imgs_uneven", "patch_values") else 1
    return draw(st.integers(smallest, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))


def _images(draw, patch, gh, gw, channels=None) -> torch.Tensor:
    shape = (draw(st.integers(1, 2)), channels or draw(st.integers(1, 3)), gh * patch, gw * patch)
    return _tensor(shape, draw(dtypes), draw(seeds), draw(st.sampled_from([1.0, 1e-3, 1e3])))


IMAGE_FAULTS = {  # a change to imgs that every image op must refuse, naming imgs
    "uneven": lambda imgs: imgs[..., :-1],
    "empty_batch": lambda imgs: imgs[:0],
    "no_channels": lambda imgs: imgs[:, :0],
    "integer": lambda imgs: imgs.long(),
    "three_dims": lambda imgs: imgs[0],
    "not_a_tensor": lambda imgs: imgs.tolist(),
}
PATCH_FAULTS = {"patch_zero": 0, "patch_negative": -2, "patch_float": 2.0, "patch_bool": True}


def _image_fault(fault, imgs, patch):
    """(imgs, patch, blamed) with ``fault`` put into imgs or patch_size, if it is one of theirs."""
    if fault in IMAGE_FAULTS:
        return IMAGE_FAULTS[fault](imgs), patch, "imgs"
    if fault in PATCH_FAULTS:
        return imgs, PATCH_FAULTS[fault], "patch_size"
    return imgs, patch, ""


# --- patchify, unpatchify, patchify_gather -------------------------------------------------------------------


@pytest.mark.parametrize("fault", [None, *IMAGE_FAULTS, *PATCH_FAULTS])
def test_fuzz_patchify(fault):
    @fuzz(fault)
    def body(data):
        patch, gh, gw = _grid(data.draw, fault)
        imgs = _images(data.draw, patch, gh, gw)
        imgs, patch, blamed = _image_fault(fault, imgs, patch)
        check_op(ops.patchify, (imgs, patch), {}, None, fault, blamed)  # data movement: exact
        if fault is None:  # unpatchify is its exact inverse
            patches = ops.patchify(imgs, patch, backend="torch")
            torch.testing.assert_close(ops.unpatchify(patches, patch, (gh, gw), backend="torch"), imgs, rtol=0, atol=0)


UNPATCHIFY_FAULTS = {
    "grid_int": ("grid_size", lambda x, p, g: (x, p, g[0])),
    "grid_float": ("grid_size", lambda x, p, g: (x, p, (float(g[0]), float(g[1])))),
    "grid_triple": ("grid_size", lambda x, p, g: (x, p, (*g, 1))),
    "grid_zero": ("grid_size", lambda x, p, g: (x, p, (0, g[1]))),
    "grid_product": ("grid_size", lambda x, p, g: (x, p, (g[0] + 1, g[1]))),
    "patch_values": ("x", lambda x, p, g: (x[..., :-1], p, g)),
    "no_values": ("x", lambda x, p, g: (x[..., :0], p, g)),
    "integer": ("x", lambda x, p, g: (x.long(), p, g)),
    "patch_zero": ("patch_size", lambda x, p, g: (x, 0, g)),
}


@pytest.mark.parametrize("fault", [None, *UNPATCHIFY_FAULTS])
def test_fuzz_unpatchify(fault):
    @fuzz(fault)
    def body(data):
        patch, gh, gw = _grid(data.draw, fault)
        dtype = data.draw(dtypes)
        x = _tensor((data.draw(st.integers(1, 2)), gh * gw, patch * patch * data.draw(st.integers(1, 3))), dtype, 0)
        args, blamed = (x, patch, (gh, gw)), ""
        if fault is not None:
            blamed, change = UNPATCHIFY_FAULTS[fault]
            args = change(*args)
        check_op(ops.unpatchify, args, {}, None, fault, blamed)


IDS_FAULTS = {
    "out_of_range": lambda ids, length: ids.index_fill(1, torch.tensor([0]), length),
    "negative": lambda ids, length: ids.index_fill(1, torch.tensor([0]), -1),
    "float": lambda ids, length: ids.float(),
    "one_dim": lambda ids, length: ids[0],
    "batch": lambda ids, length: torch.cat([ids, ids]),
}


def _kept_ids(draw, batch, length) -> torch.Tensor:
    """ids_keep [B, K]: the first K of a permutation per row, int64 or int32."""
    kept = draw(st.integers(1, length))
    return _permutations(batch, length, draw(seeds), draw(st.sampled_from([torch.int64, torch.int32])))[:, :kept]


@pytest.mark.parametrize("fault", [None, *IMAGE_FAULTS, *PATCH_FAULTS, *IDS_FAULTS])
def test_fuzz_patchify_gather(fault):
    @fuzz(fault)
    def body(data):
        patch, gh, gw = _grid(data.draw, fault)
        imgs = _images(data.draw, patch, gh, gw)
        ids = _kept_ids(data.draw, imgs.shape[0], gh * gw)
        imgs, patch, blamed = _image_fault(fault, imgs, patch)
        if fault in IDS_FAULTS:
            ids, blamed = IDS_FAULTS[fault](ids, gh * gw), "ids_keep"
        check_op(ops.patchify_gather, (imgs, ids, patch), {}, None, fault, blamed)


# --- patch_embed_gather ----------------------------------------------------------------------------------------


EMBED_FAULTS = {
    "weight_channels": ("weight", lambda a: {**a, "weight": torch.cat([a["weight"], a["weight"][:, :1]], 1)}),
    "weight_not_square": ("weight", lambda a: {**a, "weight": a["weight"][..., :-1]}),
    "weight_no_outputs": ("weight", lambda a: {**a, "weight": a["weight"][:0]}),
    "weight_integer": ("weight", lambda a: {**a, "weight": a["weight"].long()}),
    "bias_size": ("bias", lambda a: {**a, "bias": torch.zeros(a["weight"].shape[0] + 1, dtype=a["weight"].dtype)}),
    "pos_rows": ("pos_embed", lambda a: {**a, "pos_embed": torch.cat([a["pos_embed"], a["pos_embed"][:1]])}),
    "pos_one_dim": ("pos_embed", lambda a: {**a, "pos_embed": a["pos_embed"][0]}),
    "ids_out_of_range": ("ids_keep", lambda a: {**a, "ids_keep": IDS_FAULTS["out_of_range"](a["ids_keep"], a["L"])}),
    "imgs_uneven": ("imgs", lambda a: {**a, "imgs": a["imgs"][..., :-1]}),
}


@pytest.mark.parametrize("fault", [None, *EMBED_FAULTS])
def test_fuzz_patch_embed_gather(fault):
    @fuzz(fault)
    def body(data):
        patch, gh, gw = _grid(data.draw, fault)
        imgs = _images(data.draw, patch, gh, gw)
        dtype, dim = imgs.dtype, data.draw(st.integers(1, 6))
        weight = _tensor((dim, imgs.shape[1], patch, patch), dtype, data.draw(seeds))
        bias = _tensor((dim,), dtype, 1) if fault == "bias_size" or data.draw(st.booleans()) else None
        pos_embed = _tensor((gh * gw, dim), dtype, 2)
        a = dict(imgs=imgs, ids_keep=_kept_ids(data.draw, imgs.shape[0], gh * gw), weight=weight, bias=bias)
        a.update(pos_embed=pos_embed, L=gh * gw)
        blamed = ""
        if fault is not None:
            blamed, change = EMBED_FAULTS[fault]
            a = change(a)
        if data.draw(st.booleans()) and fault not in ("pos_rows", "pos_one_dim"):
            a["pos_embed"] = None if data.draw(st.booleans()) else a["pos_embed"][None]
        args = (a["imgs"], a["ids_keep"], a["weight"], a["bias"], a["pos_embed"])
        check_op(ops.patch_embed_gather, args, {}, dtype, fault, blamed)


# --- random_masking ------------------------------------------------------------------------------------------


MASKING_FAULTS = {
    "batch_zero": ("batch_size", dict(batch_size=0)),
    "batch_negative": ("batch_size", dict(batch_size=-1)),
    "batch_float": ("batch_size", dict(batch_size=2.0)),
    "patches_zero": ("num_patches", dict(num_patches=0)),
    "patches_bool": ("num_patches", dict(num_patches=True)),
    "ratio_nan": ("mask_ratio", dict(mask_ratio=NAN)),
    "ratio_inf": ("mask_ratio", dict(mask_ratio=INF)),
    "ratio_one": ("mask_ratio", dict(mask_ratio=1.0)),
    "ratio_negative": ("mask_ratio", dict(mask_ratio=-0.1)),
    "ratio_text": ("mask_ratio", dict(mask_ratio="0.5")),
    "ratio_keeps_none": ("mask_ratio", dict(mask_ratio=0.999)),
    "noise_nan": ("noise", "nan"),
    "noise_shape": ("noise", "shape"),
    "noise_integer": ("noise", "integer"),
}


@pytest.mark.parametrize("fault", [None, *MASKING_FAULTS])
def test_fuzz_random_masking(fault):
    @fuzz(fault)
    def body(data):
        batch, length, dtype = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(dtypes)
        ratios = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75]), st.floats(0.0, 1 - 1 / length))
        ratio = data.draw(ratios.filter(lambda r: reference.num_kept(length, r) >= 1))  # keeps a patch
        generator = torch.Generator().manual_seed(data.draw(seeds))
        if data.draw(st.booleans()):  # few distinct values: ties, which go to the lower patch index
            noise = (torch.randint(0, 3, (batch, length), generator=generator) / 4).to(dtype)
        else:
            noise = torch.rand(batch, length, generator=generator).to(dtype)
        a = dict(batch_size=batch, num_patches=length, mask_ratio=ratio, noise=noise)
        blamed = ""
        if fault is not None:
            blamed, change = MASKING_FAULTS[fault]
            if isinstance(change, dict):
                a.update(change)
                if blamed != "mask_ratio":
                    a["noise"] = None  # a bad size with a matching noise: the size is blamed, not the noise
            else:
                a["noise"] = {"nan": noise.index_fill(1, torch.tensor([0]), NAN), "shape": noise[:, :0]}.get(
                    change, noise.long()
                )
        args = (a["batch_size"], a["num_patches"], a["mask_ratio"])
        check_op(ops.random_masking, args, {"noise": a["noise"]}, None, fault, blamed)
        if fault is None:
            ids_keep, ids_restore, mask = ops.random_masking(*args, noise=a["noise"], backend="torch")
            kept = reference.num_kept(length, ratio)
            assert ids_keep.shape == (batch, kept) and 1 <= kept <= length
            assert torch.equal(mask.sum(1), torch.full((batch,), float(length - kept)))
            assert torch.equal(ids_restore.sort(1).values, torch.arange(length).expand(batch, -1))


# --- unshuffle_mask_tokens ----------------------------------------------------------------------------------


UNSHUFFLE_FAULTS = {
    "too_many_tokens": ("x", lambda a: {**a, "x": torch.cat([a["x"], a["x"][:, :1].expand(-1, a["L"], -1)], 1)}),
    "only_cls": ("x", lambda a: {**a, "x": a["x"][:, :1]}),
    "x_integer": ("x", lambda a: {**a, "x": a["x"].long()}),
    "token_size": ("mask_token", lambda a: {**a, "mask_token": torch.cat([a["mask_token"]] * 2, -1)}),
    "token_two_dims": ("mask_token", lambda a: {**a, "mask_token": a["mask_token"][0]}),
    "ids_out_of_range": ("ids_restore", lambda a: {**a, "ids_restore": a["ids_restore"] + 1}),
    "ids_batch": ("ids_restore", lambda a: {**a, "ids_restore": torch.cat([a["ids_restore"]] * 2)}),
    "ids_float": ("ids_restore", lambda a: {**a, "ids_restore": a["ids_restore"].float()}),
    "pos_rows": ("pos_embed", lambda a: {**a, "pos_embed": a["pos_embed"][:-1]}),
}


@pytest.mark.parametrize("fault", [None, *UNSHUFFLE_FAULTS])
def test_fuzz_unshuffle_mask_tokens(fault):
    @fuzz(fault)
    def body(data):
        batch, length, dim = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
        dtype, seed = data.draw(dtypes), data.draw(seeds)
        kept = data.draw(st.integers(1, length))
        a = dict(x=_tensor((batch, kept + 1, dim), dtype, seed), L=length)
        a["mask_token"] = _tensor(data.draw(st.sampled_from([(1, 1, dim), (dim,)])), dtype, seed + 1)
        a["ids_restore"] = _permutations(batch, length, seed)
        a["pos_embed"] = _tensor((length + 1, dim), dtype, seed + 2)
        blamed = ""
        if fault is not None:
            blamed, change = UNSHUFFLE_FAULTS[fault]
            a = change(a)
        if data.draw(st.booleans()) and fault != "pos_rows":
            a["pos_embed"] = None if data.draw(st.booleans()) else a["pos_embed"][None]
        args = (a["x"], a["mask_token"], a["ids_restore"], a["pos_embed"])
        check_op(ops.unshuffle_mask_tokens, args, {}, dtype, fault, blamed)


# --- masked_mse_loss -----------------------------------------------------------------------------------------


VALID_MASKS = ["binary", "weights", "bool", "int", "half"]
LOSS_FAULTS = {
    "mask_nothing_removed": "mask",
    "mask_minus_one_plus_one": "mask",
    "mask_nan": "mask",
    "mask_inf": "mask",
    "mask_complex": "mask",
    "mask_shape": "mask",
    "pred_shape": "pred",
    "pred_integer": "pred",
    "eps_nan": "eps",
    "eps_inf": "eps",
    "eps_zero": "eps",
    "eps_negative": "eps",
    "eps_text": "eps",
    "eps_bool": "eps",
    "norm_pix_text": "norm_pix",
}


def _mask(kind: str, batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, length, generator=generator) < 0.5).float()
    mask.view(-1)[0] = 1.0  # at least one removed patch
    return {
        "binary": mask,
        "weights": mask * torch.rand(batch, length, generator=generator) * 3,
        "bool": mask.bool(),
        "int": mask.long(),
        "half": mask.half(),
        "mask_nothing_removed": torch.zeros_like(mask),
        "mask_minus_one_plus_one": (mask * 2 - 1).index_fill(1, torch.tensor([length - 1]), -1.0),
        "mask_nan": torch.where(mask > 0, NAN, 0.0),
        "mask_inf": mask * INF,
        "mask_complex": mask.to(torch.complex64),
        "mask_shape": mask[:, :-1],
    }[kind]


@pytest.mark.parametrize("fault", [None, *LOSS_FAULTS])
def test_fuzz_masked_mse_loss(fault):
    @fuzz(fault)
    def body(data):
        patch, gh, gw = _grid(data.draw, fault)
        imgs = _images(data.draw, patch, gh, gw)
        pred_dtype, seed = data.draw(dtypes), data.draw(seeds)
        batch, length, values = imgs.shape[0], gh * gw, patch * patch * imgs.shape[1]
        norm_pix = values >= 2 and data.draw(st.booleans())
        pred = _tensor((batch, length, values), pred_dtype, seed)
        mask_kind = fault if fault and fault.startswith("mask") else data.draw(st.sampled_from(VALID_MASKS))
        mask = _mask(mask_kind, batch, length, seed)
        eps = {"eps_nan": NAN, "eps_inf": INF, "eps_zero": 0.0, "eps_negative": -1e-6, "eps_text": "1e-6"}.get(fault)
        eps = (
            True if fault == "eps_bool" else eps if eps is not None else data.draw(st.sampled_from([1e-6, 1e-12, 1.0]))
        )
        if fault == "pred_shape":
            pred = pred[..., 1:] if values > 1 else pred[:, :-1]
        elif fault == "pred_integer":
            pred = pred.long()
        args = (pred, imgs, mask, patch, "yes" if fault == "norm_pix_text" else norm_pix, eps)
        check_op(ops.masked_mse_loss, args, {}, pred_dtype, fault, LOSS_FAULTS.get(fault, ""))


# --- attention --------------------------------------------------------------------------------------------


SCALE_FAULTS = {"scale_nan": NAN, "scale_inf": INF, "scale_zero": 0.0, "scale_negative": -0.5}
SCALE_TYPE_FAULTS = {"scale_bool": True, "scale_text": "0.5", "scale_tensor": torch.tensor(0.5)}
PACKING_FAULTS = [
    "cu_not_from_zero",
    "cu_decreasing",
    "cu_int64",
    "cu_one_offset",
    "max_negative",
    "max_short",
    "max_float",
]
ATTENTION_FAULTS = [
    *SCALE_FAULTS,
    *SCALE_TYPE_FAULTS,
    *PACKING_FAULTS,
    "heads_zero",
    "heads_negative",
    "heads_float",
    "qkv_width",
    "k_shape",
    "v_dtype",
    "q_not_packed",
]
BLAME = {
    "cu_": "cu_seqlens",
    "max": "max_seqlen",
    "sca": "scale",
    "hea": "num_heads",
    "qkv": "qkv",
    "k_s": "k",
    "v_d": "v",
    "q_n": "q",
}


def _packing(draw, fault):
    """(cu_seqlens int32, total tokens, max_seqlen) of 1..3 sequences of 1..4 tokens, with a packing fault."""
    lengths = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    offsets = [0, *[sum(lengths[: i + 1]) for i in range(len(lengths))]]
    total, max_seqlen = offsets[-1], draw(st.sampled_from([None, max(lengths)]))
    if fault == "cu_not_from_zero":
        offsets = [o + 1 for o in offsets]
    elif fault == "cu_decreasing":
        offsets = [0, total, *offsets[1:-1], total] if len(offsets) > 2 else [0, total + 1, total]
    cu_seqlens = torch.tensor(offsets, dtype=torch.int64 if fault == "cu_int64" else torch.int32)
    if fault == "cu_one_offset":
        cu_seqlens = cu_seqlens[:1]
    max_seqlen = {"max_negative": -1, "max_short": max(lengths) - 1, "max_float": float(max(lengths))}.get(
        fault, max_seqlen
    )
    return cu_seqlens, total, max_seqlen


FUSED_ONLY = ("heads_zero", "heads_negative", "heads_float", "qkv_width")
SEPARATE_ONLY = ("k_shape", "v_dtype", "q_not_packed")


@pytest.mark.parametrize("fault", [None, *ATTENTION_FAULTS])
def test_fuzz_attention(fault):
    """visible_attention and qkv_attention, fixed-length [B, N, ...] and packed [T, ...] with cu_seqlens."""

    @fuzz(fault, VALID_EXAMPLES * 2 if fault is None else None)  # four layouts share the valid draws
    def body(data):
        heads, head_dim = data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 4, 8]))
        dtype, seed = data.draw(dtypes), data.draw(seeds)
        packed = fault in PACKING_FAULTS or (fault != "q_not_packed" and data.draw(st.booleans()))
        fused = fault in FUSED_ONLY or (fault not in SEPARATE_ONLY and data.draw(st.booleans()))
        scale = data.draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
        kwargs = {"scale": SCALE_FAULTS.get(fault, SCALE_TYPE_FAULTS.get(fault, scale))}
        if packed:
            cu_seqlens, tokens, max_seqlen = _packing(data.draw, fault)
            leading, extra = (tokens,), (cu_seqlens,)
            kwargs["max_seqlen"] = max_seqlen
        else:
            leading, extra = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))), ()
        qkv = _tensor((*leading, 3 * heads * head_dim), dtype, seed)
        if fused:
            num_heads = {"heads_zero": 0, "heads_negative": -1, "heads_float": float(heads)}.get(fault, heads)
            if fault == "qkv_width":
                qkv = qkv[..., :-1]
            op, args = ops.qkv_attention, (qkv, num_heads, *extra)
        else:
            q, k, v = (t.contiguous() for t in ops.attention.split_qkv(qkv, heads))
            if fault == "k_shape":
                k = k[:, :-1] if not packed else k[:-1]
            elif fault == "v_dtype":
                v = v.double() if dtype != torch.float64 else v.float()
            elif fault == "q_not_packed":
                q, k, v = q[0], k[0], v[0]
            op, args = ops.visible_attention, (q, k, v, *extra)
        blamed = next((name for prefix, name in BLAME.items() if fault and fault.startswith(prefix)), "")
        check_op(op, args, kwargs, dtype, fault, blamed)


# --- the model's constructor (on the meta device: no memory, no init) ------------------------------------------


MODEL_ARGUMENTS = {
    "img_size": st.one_of(st.sampled_from([16, (16, 8), (8, 16)]), st.sampled_from([0, -16, 16.0, (16,), (16, 0)])),
    "patch_size": st.one_of(st.sampled_from([4, 8]), st.sampled_from([0, -4, 3, 4.0])),
    "in_chans": st.one_of(st.sampled_from([1, 3]), st.sampled_from([0, -3, 3.0])),
    "embed_dim": st.one_of(st.sampled_from([8, 12]), st.sampled_from([0, -8, 8.0])),
    "depth": st.one_of(st.integers(0, 2), st.sampled_from([-1, 1.5, True])),
    "num_heads": st.one_of(st.sampled_from([1, 2, 4]), st.sampled_from([0, -1, 3, 16, 2.0])),
    "decoder_embed_dim": st.one_of(st.sampled_from([4, 8]), st.sampled_from([0, -4])),
    "decoder_depth": st.one_of(st.integers(0, 1), st.sampled_from([-1])),
    "decoder_num_heads": st.one_of(st.sampled_from([1, 2]), st.sampled_from([0, -2, 3])),
    "mlp_ratio": st.one_of(st.sampled_from([1.0, 4, 0.5]), st.sampled_from([0.0, -1.0, NAN, INF, 0.01, "4"])),
    "layer_norm_eps": st.one_of(st.sampled_from([None, 1e-6, 1e-5]), st.sampled_from([0.0, -1e-6, NAN, INF])),
    "norm_pix_loss": st.one_of(st.booleans(), st.sampled_from([1, "yes"])),
}


@settings(FUZZ, max_examples=150)
@given(st.fixed_dictionaries({}, optional=MODEL_ARGUMENTS))
def test_fuzz_model_constructor(arguments):
    """A ValueError/TypeError naming a drawn argument, or a model whose sizes are the ones asked for."""
    try:
        with torch.device("meta"):
            model = create_model("mae_vit_tiny_patch4_32", **{"img_size": 16, **arguments})
    except (ValueError, TypeError) as error:
        _assert_names_an_argument(error, {*arguments, "img_size", "head_dim"})
        event("model: refused")
        return
    event("model: built")
    img_size = arguments.get("img_size", 16)
    assert model.img_size == ((img_size, img_size) if isinstance(img_size, int) else tuple(img_size))
    assert model.num_patches == (model.img_size[0] // model.patch_size) * (model.img_size[1] // model.patch_size)
    assert model.num_patches >= 1
    for block in [*model.blocks, *model.decoder_blocks]:
        assert block.attn.head_dim >= 1 and block.attn.num_heads * block.attn.head_dim == block.norm1.weight.shape[0]
        assert block.mlp.fc1.out_features >= 1 and math.isfinite(block.norm1.eps) and block.norm1.eps > 0


# --- TrainConfig ------------------------------------------------------------------------------------------------


TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def _values(good, bad):
    """(value, valid on its own) pairs: a valid value, or one that must be refused whatever the others are."""
    return st.one_of(st.tuples(st.sampled_from(good), st.just(True)), st.tuples(st.sampled_from(bad), st.just(False)))


CONFIG_FIELDS = {
    "lr": _values([None, 1e-3, 1e-5], [NAN, INF, 0.0, -1e-3, True, "1e-3"]),
    "blr": _values([1.5e-4, 1e-3], [NAN, INF, -1.0]),
    "min_lr": _values([0.0, 1e-6, 1e-2], [NAN, INF, -1e-6]),
    "warmup_epochs": _values([0.0, 0.5, 1, 3], [NAN, INF, -1.0]),
    "epochs": _values([1, 2], [0, -1, 1.0, NAN]),
    "batch_size": _values([8, 16, 12], [0, -8, 8.0]),
    "accum_steps": _values([1, 2, 4], [0, -1]),
    "weight_decay": _values([0.0, 0.05], [NAN, -0.05, INF]),
    "betas": _values([(0.9, 0.95), (0.0, 0.5)], [(0.9,), (0.9, 1.0), (NAN, 0.9), (-0.1, 0.9), "ab"]),
    "clip_grad": _values([None, 1.0], [0.0, -1.0, NAN, INF]),
    "mask_ratio": _values([0.75, 0.5, 0.03], [NAN, -0.1, 1.0, True, 0.0, 0.99]),
    "max_steps": _values([None, 3], [0, -3, 2.5]),
    "num_workers": _values([0, 2], [-1, 1.5]),
    "img_size": _values([None], [0, -28, 28.5]),
    "model_kwargs": _values(
        [TINY, {**TINY, "in_chans": 1}], [{**TINY, "in_chans": 7}, {**TINY, "depth": -1}, {**TINY, "num_heads": 3}]
    ),
}


@settings(FUZZ, max_examples=150)
@given(st.fixed_dictionaries({}, optional=CONFIG_FIELDS))
def test_fuzz_train_config(drawn):
    """Any bad value on its own is refused; a refusal names a drawn field; an accepted config is consistent."""
    fields = {name: value for name, (value, _) in drawn.items()}
    config = TrainConfig(**{"model_kwargs": TINY, "device": "cpu", "num_workers": 0, **fields})
    must_refuse = not all(valid for _, valid in drawn.values())
    try:
        config.validate()
    except ValueError as error:
        _assert_names_an_argument(error, {*fields, "model_kwargs"} if "model_kwargs" in fields else set(fields))
        event(f"config: refused, {'a bad value' if must_refuse else 'values in conflict'}")
        return
    assert not must_refuse, f"accepted {fields}"
    event("config: accepted")
    numbers = (config.base_lr(), config.min_lr, config.blr, config.weight_decay, config.warmup_epochs)
    assert all(math.isfinite(n) for n in numbers)
    assert 0 <= config.min_lr <= config.base_lr() and 0 < config.base_lr()
    assert 0 <= config.warmup_epochs <= config.epochs and config.batch_size % config.accum_steps == 0
    assert 0 < config.mask_ratio < 1 and 1 <= int(49 * (1 - config.mask_ratio)) < 49  # 28 px / 4 = 7x7 patches
