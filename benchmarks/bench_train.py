"""End-to-end MAE training step (forward + backward + AdamW step, bf16 autocast on a GPU).

Providers: the release-semantics reference model (:mod:`benchmarks.reference_mae`, timm-style blocks with
F.scaled_dot_product_attention) eager and under torch.compile, and mae_fast's MaskedAutoencoderViT
(backend "auto") eager and under torch.compile, all starting from the same weights. Before timing, each
provider's loss and prediction on one batch and noise are checked against the reference model run in
float64. Reports step time, img/s, peak memory and MFU: the counted matmul FLOPs of a step
(:func:`benchmarks.reference_mae.model_train_flops_per_image`) over the bf16 matmul rate measured in the
same run.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from benchmarks import harness, schema
from benchmarks.reference_mae import ReferenceMAE, model_train_flops_per_image
from mae_fast.models import create_model

# name -> (mae_fast factory, overrides of its config)
MODELS = {"vit_b": ("mae_vit_base_patch16", {}), "vit_l": ("mae_vit_large_patch16", {})}
SMOKE_MODELS = {
    "tiny": (
        "mae_vit_tiny_patch4_32",
        dict(
            img_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2
        ),
    )
}
PROVIDERS = ("reference_eager", "reference_compiled", "mae_fast", "mae_fast_compiled")
MASK_RATIO = 0.75
COMPILE_MIN_BUDGET_S = 150  # a compiled ViT-L step takes a minute or two to compile; do not start one later


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _build(provider: str, base: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = ReferenceMAE.like(base) if provider.startswith("reference") else copy.deepcopy(base)
    model = model.to(device).train()
    return torch.compile(model) if provider.endswith("compiled") else model


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)


def _row(name, batch, dtype, provider, status, reason=None, **extra) -> dict:
    identity = dict(op="train_step", case=name, shape=dict(B=batch), dtype=dtype, provider=provider, mode="step")
    return schema.make_row("train_step", **identity, status=status, reason=reason, **extra)


def failed_rows(name: str, batch: int, device: torch.device, error: Exception) -> list[dict]:
    """Rows for a model whose setup failed (e.g. out of memory building the float64 reference)."""
    dtype = "bf16 autocast" if device.type == "cuda" else "fp32"
    reason = f"setup failed: {harness.error_message(error)}"
    return [_row(name, batch, dtype, provider, "error", reason) for provider in PROVIDERS]


def _time_steps(step, device: torch.device, warmup: int, steps: int) -> harness.Timing:
    for _ in range(warmup):
        step()
    harness.synchronize(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        timer = "CUDA events around each step"
    else:
        for _ in range(steps):
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
        timer = "time.perf_counter on the CPU (not a GPU claim)"
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return harness.Timing(float(q[0]), float(q[1]), float(q[2]), timer)


def run_model(
    name: str,
    model: tuple[str, dict],
    batch: int,
    device: torch.device,
    ceilings: dict,
    budget: harness.Budget,
    smoke: bool,
    with_compile: bool = True,
    compile_in_smoke: bool = False,
    steps: int = 10,
    emit: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per provider for ``model`` = (mae_fast factory name, config overrides) at ``batch`` images.

    ``emit`` receives each row as soon as it is measured (so a run cut short keeps it); the speedups
    are filled into the same row objects at the end.
    """
    dtype = "bf16 autocast" if device.type == "cuda" else "fp32"
    if budget.exhausted():
        return [_row(name, batch, dtype, provider, "skipped", "time budget exhausted") for provider in PROVIDERS]
    torch.manual_seed(0)
    base = create_model(model[0], **model[1], norm_pix_loss=True, backend="auto").to(device)
    flops = model_train_flops_per_image(base, MASK_RATIO) * batch
    size = base.img_size
    imgs = [torch.randn(batch, base.in_chans, *size, device=device) for _ in range(2)]
    noise = torch.rand(batch, base.num_patches, device=device)
    with torch.no_grad():
        exact = ReferenceMAE.like(base).double()(imgs[0].double(), MASK_RATIO, noise)
        with _autocast(device):
            eager = ReferenceMAE.like(base)(imgs[0], MASK_RATIO, noise)
        exact, eager = (exact[0], exact[1]), (eager[0], eager[1])
    rows = []
    for provider in PROVIDERS:
        compiled = provider.endswith("compiled")
        if budget.exhausted():
            reason = "time budget exhausted"
        elif compiled and not with_compile:
            reason = "torch.compile providers not requested"
        elif compiled and smoke and not compile_in_smoke:
            reason = (
                "torch.compile providers are skipped in --smoke (minutes of compile time on a CPU); --compile adds them"
            )
        elif compiled and budget.remaining() < COMPILE_MIN_BUDGET_S:
            reason = f"less than {COMPILE_MIN_BUDGET_S} s of the time budget left: not enough to compile the model"
        else:
            reason = None
        if reason is not None:
            row = _row(name, batch, dtype, provider, "skipped", reason)
        else:
            if compiled:
                torch._dynamo.reset()
            try:
                row = _run_provider(
                    name, provider, base, imgs, noise, exact, eager, flops, ceilings, device, dtype, steps
                )
            except Exception as error:  # one failing provider (e.g. a compile error) must not stop the suite
                row = _row(name, batch, dtype, provider, "error", harness.error_message(error))
        rows.append(row)
        if emit is not None:
            emit(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed = [r for r in rows if r["status"] == "ok"]
    for row in timed:
        row["speedup"] = {o["provider"]: o["median_ms"] / row["median_ms"] for o in timed if o is not row}
    return rows


def _run_provider(name, provider, base, imgs, noise, exact, eager, flops, ceilings, device, dtype, steps) -> dict:
    model = _build(provider, base, device)
    optimizer = _optimizer(model, device)
    batch = imgs[0].shape[0]
    begin = time.perf_counter()
    with _autocast(device):
        loss, pred, _ = model(imgs[0], MASK_RATIO, noise)
    loss.backward()  # builds the training graph (and compiles it) exactly as the timed steps will
    harness.synchronize(device)
    first_call_s = time.perf_counter() - begin
    verdict = harness.compare((loss.detach(), pred.detach()), exact, eager)
    check = dict(max_abs_err=verdict.max_abs_err, tolerance=verdict.tolerance)
    if not verdict.ok:
        return _row(name, batch, dtype, provider, "mismatch", verdict.detail, **check)
    counter = iter(range(1 << 30))

    def step():  # a fresh mask every step, passed as noise so compiled models reuse the checked graph
        optimizer.zero_grad(set_to_none=True)
        step_noise = torch.rand(noise.shape, device=device)
        with _autocast(device):
            step_loss, _, _ = model(imgs[next(counter) % len(imgs)], MASK_RATIO, step_noise)
        step_loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # on the CPU (--smoke) the checked first step is the only warm-up
    timing = _time_steps(step, device, warmup=3 if device.type == "cuda" else 0, steps=steps)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    tflops = flops / (timing.median_ms / 1e3) / 1e12
    return _row(
        name,
        batch,
        dtype,
        provider,
        "ok",
        median_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        img_per_s=batch / (timing.median_ms / 1e3),
        peak_mem_gb=peak,
        flops=flops,
        tflops=tflops,
        pct_of_matmul=100 * tflops / ceilings["matmul"]["tflops"],
        compile_s=first_call_s if provider.endswith("compiled") else None,
        timer=timing.timer,
        **check,
    )
