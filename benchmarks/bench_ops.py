"""Kernel benchmarks: every mae_fast op, each backend present, against its PyTorch peers.

A :class:`Case` is one op at one shape. Its providers are the eager reference (``mae_fast.reference``,
the specification), torch.compile of that reference, the mae_fast backends ("triton", "cuda", through
the public op with ``backend=``), and op-specific peers (the release's conv for the patch embedding,
every torch SDPA backend and xformers for attention). Every provider is first checked against the
reference evaluated in float64 on the same inputs; only a provider that passes is timed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks import harness, schema
from mae_fast import dispatch, ops, reference

MODES = ("fwd", "bwd", "fwd+bwd")

# Shapes at 224 px (docs/mae-spec.md). The decoder is 512 wide with 16 heads for every official model.
MODEL_SHAPES = {
    "vit_b": dict(img=224, patch=16, dim=768, heads=12, dec_dim=512, dec_heads=16),
    "vit_l": dict(img=224, patch=16, dim=1024, heads=16, dec_dim=512, dec_heads=16),
    "vit_h": dict(img=224, patch=14, dim=1280, heads=16, dec_dim=512, dec_heads=16),
}
SMOKE_SHAPES = {"tiny": dict(img=16, patch=4, dim=32, heads=2, dec_dim=32, dec_heads=2)}
MASK_RATIO = 0.75
CHANNELS = 3


@dataclass
class Provider:
    name: str
    fn: Callable[..., object]
    unavailable: Callable[..., str | None] = lambda *inputs: None
    may_refuse: bool = False  # an exception on the first call means "cannot run here", not a bug
    compiled: bool = False


@dataclass
class Case:
    op: str
    label: str
    shape: dict[str, int]
    dtype: str
    make_inputs: Callable[[], tuple]
    grad_inputs: tuple[int, ...]
    exact: Callable[..., object]
    providers: list[Provider]
    bytes_moved: Callable[[tuple, object], dict[str, int]]
    flops: dict[str, int] = field(default_factory=dict)
    modes: tuple[str, ...] = MODES
    autocast: bool = False

    @property
    def key(self) -> tuple:
        return (self.op, tuple(sorted(self.shape.items())), self.dtype)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in harness.flatten(tensors) if isinstance(t, torch.Tensor))


def _providers(
    op: str,
    spec: Callable[..., object],
    peers: list[Provider],
    op_args: Callable[..., tuple],
    explain_args: Callable[..., tuple] | None = None,
) -> list[Provider]:
    """The eager reference ``spec``, the ``peers``, then the "triton" and "cuda" backends: ``mae_fast.ops.<op>``
    on ``op_args(*inputs)``, each skipped with the dispatcher's reason when it cannot run (asked with
    ``explain_args(*inputs)``, by default the same arguments)."""
    public_op = getattr(ops, op)
    explain_args = explain_args or op_args
    providers = [Provider("reference", spec), *peers]
    for backend in ("triton", "cuda"):

        def run(*inputs, backend=backend):
            return public_op(*op_args(*inputs), backend=backend)

        def unavailable(*inputs, backend=backend):
            return dispatch.explain(op, *explain_args(*inputs))[backend]

        providers.append(Provider(backend, run, unavailable))
    return providers


def _compiled(fn: Callable[..., object], smoke: bool, compile_in_smoke: bool) -> Provider:
    compiled_fn = torch.compile(fn, dynamic=False)

    def unavailable(*inputs):
        if smoke and not compile_in_smoke:
            return "torch.compile peers are skipped in --smoke (minutes of compile time on a CPU); --compile adds them"
        return None

    return Provider("reference_compiled", lambda *inputs: compiled_fn(*inputs), unavailable, compiled=True)


def _random_ids(batch: int, num_patches: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    noise = torch.rand(batch, num_patches, device=device)
    return reference.random_masking(noise, reference.num_kept(num_patches, MASK_RATIO))


def patchify_gather_case(label, cfg, batch, device, peers) -> Case:
    p, side = cfg["patch"], cfg["img"]
    length = (side // p) ** 2
    kept = reference.num_kept(length, MASK_RATIO)

    def make_inputs():
        imgs = torch.randn(batch, CHANNELS, side, side, device=device)
        return imgs, _random_ids(batch, length, device)[0]

    def bytes_moved(inputs, out):
        imgs, ids = inputs
        read = _nbytes(imgs) * kept // length + _nbytes(ids)
        return {
            "fwd": read + _nbytes(out),
            "bwd": _nbytes(out) + _nbytes(imgs),
            "fwd+bwd": read + 2 * _nbytes(out) + _nbytes(imgs),
        }

    def spec(imgs, ids):
        return reference.patchify_gather(imgs, ids, p)

    providers = _providers("patchify_gather", spec, peers(spec), lambda imgs, ids: (imgs, ids, p))
    return Case(
        "patchify_gather",
        label,
        dict(B=batch, C=CHANNELS, H=side, W=side, p=p, K=kept),
        "fp32",
        make_inputs,
        (0,),
        spec,
        providers,
        bytes_moved,
    )


def patch_embed_gather_case(label, cfg, batch, device, peers, autocast) -> Case:
    p, side, dim = cfg["patch"], cfg["img"], cfg["dim"]
    grid = side // p
    length, patch_dim = grid * grid, CHANNELS * p * p
    kept = reference.num_kept(length, MASK_RATIO)

    def make_inputs():
        imgs = torch.randn(batch, CHANNELS, side, side, device=device)
        weight = torch.randn(dim, CHANNELS, p, p, device=device) * patch_dim**-0.5
        bias = torch.randn(dim, device=device) * 0.02
        pos = torch.randn(1, length, dim, device=device)
        return imgs, _random_ids(batch, length, device)[0], weight, bias, pos

    def release_conv(imgs, ids, weight, bias, pos):
        tokens = F.conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos
        return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, dim))

    def bytes_moved(inputs, out):
        imgs, ids, weight, bias, pos = inputs
        read = _nbytes(imgs) * kept // length + _nbytes(ids, weight, bias) + _nbytes(pos) * kept // length
        grads = _nbytes(weight, bias)
        return {
            "fwd": read + _nbytes(out),
            "bwd": _nbytes(out) + read + grads,
            "fwd+bwd": 2 * read + 2 * _nbytes(out) + grads,
        }

    gemm = 2 * batch * kept * patch_dim * dim
    spec = reference.patch_embed_gather
    release = Provider("release_conv_all_patches", release_conv)
    providers = _providers("patch_embed_gather", spec, [release, *peers(spec)], lambda *inputs: inputs)
    return Case(
        "patch_embed_gather",
        label,
        dict(B=batch, C=CHANNELS, H=side, W=side, p=p, K=kept, D=dim),
        "bf16 autocast, fp32 imgs" if autocast else "fp32",
        make_inputs,
        (2, 3),  # the weight and bias get gradients; images and the frozen position table do not
        spec,
        providers,
        bytes_moved,
        flops={"fwd": gemm, "bwd": gemm, "fwd+bwd": 2 * gemm},
        autocast=autocast,
    )


def unshuffle_case(label, cfg, batch, device, peers, dtype) -> Case:
    p, side, dim = cfg["patch"], cfg["img"], cfg["dec_dim"]
    length = (side // p) ** 2
    kept = reference.num_kept(length, MASK_RATIO)

    def make_inputs():
        x = torch.randn(batch, kept + 1, dim, device=device, dtype=dtype)
        mask_token = torch.randn(1, 1, dim, device=device) * 0.02
        pos = torch.randn(1, length + 1, dim, device=device)
        return x, mask_token, _random_ids(batch, length, device)[1], pos

    def bytes_moved(inputs, out):
        x, mask_token, restore, pos = inputs
        read = _nbytes(x, mask_token, restore, pos)
        return {
            "fwd": read + _nbytes(out),
            "bwd": _nbytes(out) + _nbytes(restore) + _nbytes(x, mask_token),
            "fwd+bwd": read + 2 * _nbytes(out) + _nbytes(restore) + _nbytes(x, mask_token),
        }

    spec = reference.unshuffle_mask_tokens
    providers = _providers("unshuffle_mask_tokens", spec, peers(spec), lambda *inputs: inputs)
    return Case(
        "unshuffle_mask_tokens",
        label,
        dict(B=batch, K=kept, L=length, Dd=dim),
        _dtype_name(dtype),
        make_inputs,
        (0, 1),
        spec,
        providers,
        bytes_moved,
    )


def masked_mse_loss_case(label, cfg, batch, device, peers, dtype) -> Case:
    p, side = cfg["patch"], cfg["img"]
    length = (side // p) ** 2
    kept = reference.num_kept(length, MASK_RATIO)

    def make_inputs():
        pred = torch.randn(batch, length, p * p * CHANNELS, device=device, dtype=dtype)
        imgs = torch.randn(batch, CHANNELS, side, side, device=device)
        return pred, imgs, _random_ids(batch, length, device)[2]

    def loss_args(pred, imgs, mask):
        return pred, imgs, mask, p, True, 1e-6  # the pixel-normalised loss with the release's eps

    def loss(pred, imgs, mask):
        return reference.masked_mse_loss(*loss_args(pred, imgs, mask))

    def bytes_moved(inputs, out):
        pred, imgs, mask = inputs
        read = _nbytes(pred, mask) + _nbytes(imgs) * (length - kept) // length
        return {"fwd": read, "bwd": read + _nbytes(pred), "fwd+bwd": read + _nbytes(pred)}

    providers = _providers("masked_mse_loss", loss, peers(loss), loss_args)
    return Case(
        "masked_mse_loss",
        label,
        dict(B=batch, L=length, P=p * p * CHANNELS, H=side, W=side),
        f"{_dtype_name(dtype)} pred, fp32 imgs",
        make_inputs,
        (0,),
        loss,
        providers,
        bytes_moved,
    )


def random_masking_case(label, cfg, batch, device, peers) -> Case:
    length = (cfg["img"] // cfg["patch"]) ** 2
    kept = reference.num_kept(length, MASK_RATIO)

    def make_inputs():
        return (torch.rand(batch, length, device=device),)

    def masking(noise):
        return reference.random_masking(noise, kept)

    def bytes_moved(inputs, out):
        return {"fwd": _nbytes(inputs) + _nbytes(out)}

    providers = _providers(
        "random_masking",
        masking,
        peers(masking),
        lambda noise: (batch, length, MASK_RATIO, noise),
        lambda noise: (noise, kept),
    )
    return Case(
        "random_masking",
        label,
        dict(B=batch, L=length, K=kept),
        "fp32 noise",
        make_inputs,
        (),
        masking,
        providers,
        bytes_moved,
        modes=("fwd",),
    )


def resized_crop_case(label, cfg, batch, device, peers, dtype) -> Case:
    """RandomResizedCrop of uint8 images of ImageNet-like sizes (4/3 to 9/4 of the output side, 298-504 px at
    224) to the model's input, with flips and the ImageNet mean / std, written in the model's input dtype."""
    from mae_fast.backends.reference.resized_crop import resized_crop_spec
    from mae_fast.train.data import random_resized_crop_box

    side = cfg["img"]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def make_inputs():
        sides = torch.randint(side * 4 // 3, side * 9 // 4 + 1, (batch, 2)).tolist()
        images = [torch.randint(0, 256, (CHANNELS, h, w), dtype=torch.uint8, device=device) for h, w in sides]
        generator = torch.Generator().manual_seed(len(images))
        boxes = torch.tensor([random_resized_crop_box(h, w, generator) for h, w in sides])
        return images, boxes, torch.rand(batch) < 0.5

    def spec(images, boxes, flip):
        return resized_crop_spec(images, boxes, (side, side), flip, mean, std, dtype)

    def exact(images, boxes, flip):
        return resized_crop_spec(images, boxes, (side, side), flip, mean, std, torch.float64, torch.float64, False)

    def op_args(images, boxes, flip):
        return images, boxes, side, flip, mean, std, dtype

    def explain_args(images, boxes, flip):
        return images, boxes.to(device), (side, side), flip.to(device), mean, std, dtype

    def bytes_moved(inputs, out):
        _, boxes, _ = inputs
        crops = int((boxes[:, 2] * boxes[:, 3]).sum()) * CHANNELS
        return {"fwd": crops + _nbytes(out)}

    def torch_backend(images, boxes, flip):
        return ops.resized_crop(*op_args(images, boxes, flip), backend="torch")

    peer = Provider("torch_backend_interpolate_per_crop", torch_backend)
    providers = _providers("resized_crop", spec, [peer, *peers(spec)], op_args, explain_args)
    return Case(
        "resized_crop",
        label,
        dict(B=batch, C=CHANNELS, H=side, W=side),
        f"uint8 images, {_dtype_name(dtype)} out",
        make_inputs,
        (),
        exact,
        providers,
        bytes_moved,
        modes=("fwd",),
    )


def _sdpa_providers(device) -> list[Provider]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    providers = []
    for name, backend in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa_math", SDPBackend.MATH),
    ):

        def run(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)

        providers.append(Provider(name, run, may_refuse=True))
    return providers


def _xformers_provider() -> list[Provider]:
    try:
        from xformers.ops import memory_efficient_attention
    except Exception:  # optional peer: absent or built for another CUDA; recorded in the environment
        return []
    return [Provider("xformers_memory_efficient", lambda q, k, v: memory_efficient_attention(q, k, v), may_refuse=True)]


def _attention_case(op, label, shape, dtype, make_inputs, attend, providers, fwd_flops) -> Case:
    """A Case of attention on q, k, v (the first three inputs, which get gradients): the forward reads them and
    writes the output; the backward reads them, the output and its gradient, writes three gradients and does
    2.5 times the forward's matmul FLOPs."""

    def bytes_moved(inputs, out):
        qkv, written = _nbytes(inputs[:3]), _nbytes(out)
        return {"fwd": qkv + written, "bwd": 2 * qkv + 2 * written, "fwd+bwd": 3 * qkv + 3 * written}

    flops = {"fwd": fwd_flops, "bwd": int(2.5 * fwd_flops), "fwd+bwd": int(3.5 * fwd_flops)}
    return Case(
        op, label, shape, _dtype_name(dtype), make_inputs, (0, 1, 2), attend, providers, bytes_moved, flops=flops
    )


def attention_case(label, batch, seq, heads, head_dim, device, peers, dtype) -> Case:
    def make_inputs():
        return tuple(torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype) for _ in range(3))

    def attend(q, k, v):
        return reference.attention(q, k, v)[0]

    fwd = 4 * batch * heads * seq * seq * head_dim
    providers = _providers(
        "visible_attention",
        attend,
        [*peers(attend), *_sdpa_providers(device), *_xformers_provider()],
        lambda q, k, v: (q, k, v),
        lambda q, k, v: (q, k, v, None, q.shape[1], q.shape[-1] ** -0.5),
    )
    shape = dict(B=batch, N=seq, H=heads, d=head_dim)
    return _attention_case("visible_attention", label, shape, dtype, make_inputs, attend, providers, fwd)


def varlen_lengths(batch: int, seq: int, generator: torch.Generator) -> list[int]:
    """Per-sample lengths uniform in [seq/2, 3*seq/2] (+-50%) that add up to exactly batch * seq."""
    low, high = max(1, math.ceil(seq / 2)), math.floor(3 * seq / 2)
    lengths = torch.randint(low, high + 1, (batch,), generator=generator).tolist()
    excess = sum(lengths) - batch * seq
    index = 0
    while excess:
        step = 1 if excess > 0 else -1
        if low <= lengths[index] - step <= high:
            lengths[index] -= step
            excess -= step
        index = (index + 1) % batch
    return lengths


def varlen_attention_case(label, batch, seq, heads, head_dim, device, dtype) -> Case:
    lengths = varlen_lengths(batch, seq, torch.Generator().manual_seed(batch * 1000 + seq))
    offsets = [0] + list(itertools.accumulate(lengths))
    total, max_len = offsets[-1], max(lengths)

    def make_inputs():
        qkv = tuple(torch.randn(total, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
        return qkv + (torch.tensor(offsets, dtype=torch.int32, device=device),)

    def attend(q, k, v, cu_seqlens):
        return reference.varlen_attention(q, k, v, cu_seqlens)[0]

    fwd = sum(4 * heads * n * n * head_dim for n in lengths)
    providers = _providers(
        "visible_attention",
        attend,
        [],
        lambda q, k, v, cu: (q, k, v, cu, max_len),
        lambda q, k, v, cu: (q, k, v, cu, max_len, q.shape[-1] ** -0.5),
    )
    shape = dict(B=batch, N=seq, H=heads, d=head_dim, T=total, N_min=min(lengths), N_max=max_len)
    return _attention_case("visible_attention_varlen", label, shape, dtype, make_inputs, attend, providers, fwd)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def build_cases(
    models: dict[str, dict],
    batch: int,
    device: torch.device,
    smoke: bool,
    with_compile: bool,
    compile_in_smoke: bool = False,
    ops_filter: set[str] | None = None,
    modes: tuple[str, ...] = MODES,
) -> list[Case]:
    """Every op at the shapes of ``models`` and ``batch``; shapes shared by two models appear once."""
    cuda = device.type == "cuda"
    act = torch.bfloat16 if cuda else torch.float32

    def peers(fn):
        return [_compiled(fn, smoke, compile_in_smoke)] if with_compile else []

    cases, seen = [], set()
    for name, cfg in models.items():
        tokens = (cfg["img"] // cfg["patch"]) ** 2
        enc_len = reference.num_kept(tokens, MASK_RATIO) + 1
        enc = (cfg["heads"], cfg["dim"] // cfg["heads"])
        dec = (cfg["dec_heads"], cfg["dec_dim"] // cfg["dec_heads"])
        candidates = [
            patchify_gather_case(name, cfg, batch, device, peers),
            patch_embed_gather_case(name, cfg, batch, device, peers, autocast=cuda),
            unshuffle_case(name, cfg, batch, device, peers, act),
            masked_mse_loss_case(name, cfg, batch, device, peers, act),
            random_masking_case(name, cfg, batch, device, peers),
            resized_crop_case(name, cfg, batch, device, peers, act),
            attention_case(f"{name}/encoder", batch, enc_len, *enc, device, peers, act),
            attention_case(f"{name}/decoder", batch, tokens + 1, *dec, device, peers, act),
            varlen_attention_case(f"{name}/encoder", batch, enc_len, *enc, device, act),
        ]
        for case in candidates:
            wanted = ops_filter is None or case.op in ops_filter or case.op.removesuffix("_varlen") in ops_filter
            if wanted and case.key not in seen:
                seen.add(case.key)
                case.modes = tuple(m for m in case.modes if m in modes) or case.modes[:1]
                cases.append(case)
    return cases


# --- running a case --------------------------------------------------------------------------------


def detached_inputs(inputs: tuple, grad_inputs: tuple[int, ...], dtype: torch.dtype | None = None) -> tuple:
    """Detached copies (cast to ``dtype`` if floating and given); the grad_inputs require grad."""
    out = []
    for index, value in enumerate(inputs):
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            if index in grad_inputs:
                value = value.clone().requires_grad_(True)
        out.append(value)
    return tuple(out)


def _forward(case: Case, fn: Callable, inputs: tuple, device: torch.device):
    context = torch.autocast(device.type, dtype=torch.bfloat16) if case.autocast else nullcontext()
    with context:
        return fn(*inputs)


def _outputs_and_grads(case: Case, fn: Callable, inputs: tuple, grad_out, device, exact: bool = False):
    """(output, grads of the grad_inputs) of ``fn`` on fresh leaves of ``inputs``."""
    leaves = detached_inputs(inputs, case.grad_inputs, torch.float64 if exact else None)
    out = fn(*leaves) if exact else _forward(case, fn, leaves, device)
    if not case.grad_inputs or not any(m != "fwd" for m in case.modes):
        return out, []
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [leaves[i].grad for i in case.grad_inputs]


def _row(case: Case, provider: str, mode: str, status: str, reason: str | None = None, **extra) -> dict:
    identity = dict(op=case.op, case=case.label, shape=dict(case.shape), dtype=case.dtype, provider=provider, mode=mode)
    return schema.make_row("kernel", **identity, status=status, reason=reason, flops=case.flops.get(mode), **extra)


def _timed_fn(case: Case, fn: Callable, sets: list[tuple], mode: str, grad_out, device):
    """(closure to time, tensors whose .grad is reset, set-up to run untimed before each call or None) for
    one mode, cycling over input sets. "bwd" runs a fresh forward before each timed backward: a backward
    may free what its forward saved (the Triton masked_mse_loss hands out its saved gradient)."""
    leaves = [detached_inputs(inputs, case.grad_inputs) for inputs in sets]
    resets = [leaf[i] for leaf in leaves for i in case.grad_inputs]
    order = itertools.cycle(range(len(leaves)))
    if mode == "fwd":
        return (lambda: _forward(case, fn, leaves[next(order)], device)), resets, None
    if mode == "fwd+bwd":

        def step():
            out = _forward(case, fn, leaves[next(order)], device)
            out.backward(grad_out.to(out.dtype))

        return step, resets, None
    pending = []

    def forward():
        out = _forward(case, fn, leaves[next(order)], device)
        pending.append((out, grad_out.to(out.dtype)))

    def backward():
        out, grad = pending.pop()
        out.backward(grad)

    return backward, resets, forward


def run_case(
    case: Case, device: torch.device, ceilings: dict, budget: harness.Budget, smoke: bool, rep_ms: int = 100
) -> list[dict]:
    """Gate and time every provider of ``case`` in every mode; one row per (provider, mode)."""
    if budget.exhausted():
        return [_row(case, p.name, m, "skipped", "time budget exhausted") for p in case.providers for m in case.modes]
    inputs = case.make_inputs()
    eager = next(p for p in case.providers if p.name == "reference")
    eager_out = _forward(case, eager.fn, detached_inputs(inputs, ()), device)
    grad_out = None
    if case.grad_inputs:
        grad_out = torch.ones_like(eager_out) if eager_out.dim() == 0 else torch.randn_like(eager_out)
    exact = _outputs_and_grads(case, case.exact, inputs, grad_out, device, exact=True)
    eager_result = _outputs_and_grads(case, eager.fn, inputs, grad_out, device)
    moved = case.bytes_moved(inputs, eager_out)
    sets = [inputs] + [case.make_inputs() for _ in range(harness.rotation_count(_nbytes(inputs), device) - 1)]

    rows = []
    for provider in case.providers:
        try:
            reason = provider.unavailable(*inputs)
        except Exception as error:  # e.g. a stale extension that fails to load: this provider cannot run
            reason = f"availability check failed: {type(error).__name__}: {error}"
        if reason is None and budget.exhausted():
            reason = "time budget exhausted"
        if reason is not None:
            rows += [_row(case, provider.name, m, "skipped", reason) for m in case.modes]
            continue
        try:
            result = _outputs_and_grads(case, provider.fn, inputs, grad_out, device)
        except Exception as error:  # report and go on: one broken provider must not stop the suite
            status = "skipped" if provider.may_refuse else "error"
            rows += [_row(case, provider.name, m, status, harness.error_message(error)) for m in case.modes]
            continue
        verdict = harness.compare(result, exact, eager_result)
        check = dict(max_abs_err=verdict.max_abs_err, tolerance=verdict.tolerance)
        if not verdict.ok:
            rows += [_row(case, provider.name, m, "mismatch", verdict.detail, **check) for m in case.modes]
            continue
        for mode in case.modes:
            try:
                fn, resets, setup = _timed_fn(case, provider.fn, sets, mode, grad_out, device)
                timing = harness.measure(fn, device, resets, smoke, rep_ms, setup)
            except Exception as error:  # e.g. out of memory in one mode: record it, time the others
                rows.append(_row(case, provider.name, mode, "error", harness.error_message(error), **check))
                continue
            rows.append(_row(case, provider.name, mode, "ok", **check, **_rates(case, mode, timing, moved, ceilings)))
    add_speedups(rows)
    harness.synchronize(device)
    return rows


def failed_case_rows(case: Case, error: Exception) -> list[dict]:
    """Rows for a case whose setup itself failed (e.g. out of memory in the float64 reference)."""
    return [
        _row(case, p.name, m, "error", f"case setup failed: {harness.error_message(error)}")
        for p in case.providers
        for m in case.modes
    ]


def _rates(case: Case, mode: str, timing: harness.Timing, moved: dict[str, int], ceilings: dict) -> dict:
    seconds = timing.median_ms / 1e3
    rates = dict(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, timer=timing.timer)
    if mode in moved:
        gbps = moved[mode] / seconds / 1e9
        rates.update(bytes=moved[mode], gbps=gbps, pct_of_copy_bw=100 * gbps / ceilings["copy"]["gbps"])
    if case.flops.get(mode):
        tflops = case.flops[mode] / seconds / 1e12
        rates.update(tflops=tflops, pct_of_matmul=100 * tflops / ceilings["matmul"]["tflops"])
    return rates


def add_speedups(rows: list[dict]) -> None:
    """speedup[peer] = peer's median / this row's median, for every timed peer of the same case and mode."""
    timed = [r for r in rows if r["status"] == "ok"]
    for row in timed:
        row["speedup"] = {
            other["provider"]: other["median_ms"] / row["median_ms"]
            for other in timed
            if other is not row and other["mode"] == row["mode"] and other["median_ms"] > 0
        }
