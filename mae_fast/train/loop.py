"""The pretraining loop: ``mae_fast.train.pretrain(config)``.

Steady state is free of host synchronisation: each step's loss is added to a device tensor, the
update of a step with a non-finite loss or gradient norm is skipped on the device (the fused AdamW's
``found_inf`` input), and the host reads the sums every ``log_every`` steps. There the ``nonfinite``
policy applies: "stop" raises :class:`NonFiniteLossError` (the weights never took the bad update, no new
checkpoint is written), "skip" logs how many updates were skipped and goes on.

``precision="fp16"`` (GPUs without bf16; the release trained in fp16) runs float16 autocast with torch.amp's
GradScaler: the loss is scaled before the backward, the gradients are unscaled before the norm (so clipping
sees true values), and a step whose gradients overflowed at a finite loss is skipped and counted like any
non-finite step, while the scaler backs off; that is the scaler's normal work, so it never stops the run
under "stop" (a non-finite loss still does). The scaler's state is checkpointed and resumed exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch

from mae_fast.train import checkpointing, data, distributed, encoded_data, schedule
from mae_fast.train.config import TrainConfig
from mae_fast.train.runmodel import build_model, resolve_device
from mae_fast.train.visualize import save_loss_curve, save_reconstruction_grid

#: GradScaler's initial loss scale for precision="fp16" (torch's default).
FP16_INIT_SCALE = 2.0**16


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient was seen and ``nonfinite="stop"``."""


@dataclass
class PretrainResult:
    """What a run did. ``history`` holds (step, mean loss since the previous entry) per log read."""

    output_dir: str
    step: int
    total_steps: int
    history: list[tuple[int, float]] = field(default_factory=list)
    interrupted: str | None = None
    checkpoint: str | None = None
    export: str | None = None
    skipped_steps: int = 0
    bad_images: int = 0


class StopFlag:
    """SIGTERM / SIGINT set the flag (the loop checkpoints and returns); a second SIGINT interrupts."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _MetricsWriter:
    """metrics.jsonl (rank 0), plus TensorBoard scalars when tensorboard is importable."""

    def __init__(self, output_dir: str, keep_until_step: int):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        kept, torn = [], 0
        if os.path.isfile(self.path):
            with open(self.path) as f:
                for line in filter(str.strip, f):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill during its append
                        torn += 1
                        continue
                    if record.get("step", 0) <= keep_until_step:
                        kept.append(json.dumps(record) + "\n")
        if torn:
            print(f"{self.path}: dropped {torn} torn line(s) (a write cut short by a kill)", flush=True)
        checkpointing.atomic_write_text(self.path, "".join(kept))
        self.tensorboard = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def pretrain(config: TrainConfig) -> PretrainResult:
    """Run (or resume) MAE pretraining as ``config`` says; also works under torchrun (DDP / FSDP2).

    Writes to ``config.output_dir``: config.json, metrics.jsonl, checkpoints/checkpoint-<step>.pt (the
    newest ``keep_last``), vis/reconstruction-<step>.png at each checkpoint, loss_curve.png and the
    release-format export mae_pretrain.pth ({'model': state_dict, 'args': config}) at the end. A run that is
    refused (a folder holding another run's checkpoints, a resume with other settings or from an older
    checkpoint without ``overwrite``, an unreadable resume target) raises before it writes anything.
    """
    config.validate()
    device = resolve_device(config)
    ctx = distributed.setup(device.type)
    opened: list[data.TrainData] = []
    try:
        return _run(config, device, ctx, opened)
    finally:
        for train_data in opened:  # its workers must not outlive the run (data.shutdown_workers)
            train_data.close()
        distributed.teardown(ctx)


def _run(
    config: TrainConfig, device: torch.device, ctx: distributed.DistContext, opened: list[data.TrainData]
) -> PretrainResult:
    micro_batch = config.micro_batch(ctx.world_size)
    ckpt_dir = os.path.join(config.output_dir, "checkpoints")
    # everything that can refuse the run comes before the first write to the run folder
    resume = checkpointing.resolve_resume(config.resume, ckpt_dir)
    newer = _check_run_folder(config, ckpt_dir, resume)
    core = model = build_model(config, device)  # core: the bare MAE, whatever wrapping follows
    build_data = encoded_data.build_encoded_train_data if _decodes_on_device(config, device) else data.build_train_data
    train_data = build_data(config, core.img_size[0], core.num_patches, ctx.world_size, ctx.rank, device)
    opened.append(train_data)
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    end_step = min(total_steps, config.max_steps) if config.max_steps else total_steps
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    peak_lr = config.base_lr()

    model = distributed.wrap(model, ctx, config.sharding, device)
    optimizer = schedule.build_optimizer(model, peak_lr, config.weight_decay, config.betas)
    scheduler = schedule.build_scheduler(optimizer, warmup_steps, total_steps, peak_lr, config.min_lr)
    found_inf = torch.zeros((), dtype=torch.float32, device=device)
    optimizer.found_inf = found_inf  # read by the fused AdamW: a 1 skips the whole update on the device
    scaler = torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE) if config.precision == "fp16" else None

    step, history = 0, []
    if resume is not None:
        for reason in resume.skipped.values():
            _say(ctx, f"resume: skipped and removed {reason}")
        state = resume.state
        distributed.load_full_state(model, optimizer, state["model"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = resume.step, [tuple(h) for h in state["metrics"]["history"]]
        rngs = state["rng"]
        checkpointing.set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        elif scaler is not None:
            _say(ctx, f"resume: {resume.path} was not trained in fp16; the loss scale starts at {FP16_INIT_SCALE:g}")
        _say(ctx, f"resuming from {resume.path} (step {step})")
    else:
        torch.manual_seed(config.seed + ctx.rank)
    distributed.barrier(ctx)
    if ctx.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        _drop_outputs_after(config.output_dir, newer, step)
        checkpointing.atomic_write_text(os.path.join(config.output_dir, "config.json"), config.to_json() + "\n")

    result = PretrainResult(config.output_dir, step, total_steps, history=history)
    metrics = _MetricsWriter(config.output_dir, step) if ctx.is_main else None
    step_model = torch.compile(model) if config.compile else model
    amp_dtype = _autocast_dtype(config.precision, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    vis_batch = _vis_batch(config, train_data, core) if ctx.is_main and config.visualize else None
    seen_bad: set[str] = set()
    progress = None
    if ctx.is_main and config.progress:
        from tqdm import tqdm

        progress = tqdm(total=end_step, initial=step, unit="step", dynamic_ncols=True, desc="pretrain")

    def save(at_step: int) -> str | None:
        model_state, optim_state = distributed.full_state(model, optimizer)
        rngs = distributed.all_gather_objects(checkpointing.rng_state(), ctx)
        path = None
        if ctx.is_main:
            bad = [k for k, v in model_state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise NonFiniteLossError(f"refusing to checkpoint non-finite weights: {', '.join(bad[:5])}")
            state = {
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": scheduler.state_dict(),
                "step": at_step,
                "epoch": at_step // steps_per_epoch,
                "micro_batch": (at_step % steps_per_epoch) * config.accum_steps,
                "rng": rngs,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "metrics": {"history": [list(h) for h in result.history]},
                "config": config.to_dict(),
                "world_size": ctx.world_size,
            }
            path = checkpointing.save_checkpoint(state, ckpt_dir, config.keep_last)
            if vis_batch is not None:
                _save_pictures(config, model_state, vis_batch, at_step)
        distributed.barrier(ctx)
        return path

    def stopped(signal_name: str) -> PretrainResult:
        result.interrupted = signal_name
        result.checkpoint = save(step)
        _say(ctx, f"stopped by {signal_name} at step {step}: {result.checkpoint}")
        return result

    # device-side accumulators, read every log_every steps
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    good_steps = torch.zeros((), dtype=torch.float64, device=device)
    bad_steps = torch.zeros((), dtype=torch.float64, device=device)
    fatal_steps = torch.zeros((), dtype=torch.float64, device=device)  # bad steps the scaler does not explain
    last_norm = torch.zeros((), dtype=torch.float32, device=device)
    window_start, window_step = time.perf_counter(), step
    fsdp = ctx.distributed and config.sharding == "fsdp"
    ddp = ctx.distributed and not fsdp

    with StopFlag() as stop:
        try:
            while step < end_step:
                epoch = step // steps_per_epoch
                epoch_end = min(end_step, (epoch + 1) * steps_per_epoch)
                done = (step % steps_per_epoch) * config.accum_steps
                batches = train_data.start(epoch, done, micro_batch)
                while step < epoch_end:
                    model.train()
                    step_loss = torch.zeros((), dtype=torch.float32, device=device)
                    for micro in range(config.accum_steps):
                        try:
                            batch = next(batches)
                        except RuntimeError as error:  # a worker killed by the signal we are stopping for
                            if stop.signal_name is None or ctx.distributed or "DataLoader worker" not in str(error):
                                raise
                            return stopped(stop.signal_name)  # the weights are those of `step`, complete
                        if batch["bad"]:
                            result.bad_images += data.report_bad(batch["bad"], seen_bad)
                        imgs = batch["imgs"].to(device, non_blocking=True)
                        noise = batch["noise"].to(device, non_blocking=True)
                        last = micro == config.accum_steps - 1
                        if fsdp:
                            model.set_requires_gradient_sync(last)
                        sync = model.no_sync() if ddp and not last else contextlib.nullcontext()
                        with sync:
                            with autocast:
                                loss, _, _ = step_model(imgs, config.mask_ratio, noise, return_pred=False)
                            scaled = loss / config.accum_steps
                            (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        step_loss += loss.detach().float()
                    step_loss /= config.accum_steps
                    if scaler is not None:
                        scaler.unscale_(optimizer)  # no host sync; records the overflow for update()
                    norm = _grad_norm(params, config.clip_grad)
                    bad = ~(torch.isfinite(step_loss) & torch.isfinite(norm))
                    found_inf.copy_(bad)
                    optimizer.step()
                    if scaler is not None:
                        scaler.update()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum += torch.where(bad, 0.0, step_loss.double())
                    good_steps += (~bad).double()
                    bad_steps += bad.double()
                    fatal_steps += (bad if scaler is None else ~torch.isfinite(step_loss)).double()
                    last_norm.copy_(torch.where(bad, last_norm, norm.float()))
                    step += 1
                    result.step = step
                    if progress is not None:
                        progress.update(1)

                    stopping = stop.signal_name is not None and not ctx.distributed
                    checkpointing_now = bool(config.ckpt_every) and step % config.ckpt_every == 0
                    if step % config.log_every == 0 or step == end_step or stopping or checkpointing_now:
                        flag = torch.tensor(float(stop.signal_name is not None), dtype=torch.float64, device=device)
                        stacked = torch.stack([loss_sum, good_steps, bad_steps, fatal_steps, flag])
                        total_loss, n_good, n_bad, n_fatal, n_stop = distributed.sum_tensor(stacked, ctx).tolist()
                        elapsed = time.perf_counter() - window_start
                        images = (step - window_step) * config.batch_size
                        record = {
                            "step": step,
                            "epoch": step / steps_per_epoch,
                            "loss": total_loss / n_good if n_good else math.nan,
                            "lr": optimizer.param_groups[0]["lr"],
                            "grad_norm": float(last_norm),
                            "img_per_s": images / elapsed if elapsed > 0 else math.nan,
                            "skipped_steps": result.skipped_steps + int(n_bad / ctx.world_size),
                            "bad_images": result.bad_images,
                        }
                        if scaler is not None:
                            record["loss_scale"] = scaler.get_scale()
                        result.skipped_steps = record["skipped_steps"]
                        if n_good:
                            result.history.append((step, record["loss"]))
                        if metrics is not None:
                            metrics.write(record)
                        if progress is not None:
                            progress.set_postfix(
                                loss=f"{record['loss']:.4f}",
                                lr=f"{record['lr']:.2e}",
                                img_s=f"{record['img_per_s']:.0f}",
                            )
                        if n_fatal and config.nonfinite == "stop":
                            raise NonFiniteLossError(
                                f"non-finite loss or gradient in {int(n_fatal / ctx.world_size)} of the steps "
                                f"{window_step + 1}..{step}; those updates were skipped, nothing was saved after "
                                f"them (nonfinite='skip' goes on instead)"
                            )
                        for accumulator in (loss_sum, good_steps, bad_steps, fatal_steps):
                            accumulator.zero_()
                        window_start, window_step = time.perf_counter(), step
                        if n_stop:
                            return stopped(stop.signal_name or "SIGTERM")
                    if checkpointing_now and step < end_step:
                        result.checkpoint = save(step)
        finally:
            if progress is not None:
                progress.close()
            if metrics is not None:
                metrics.close()

    result.checkpoint = save(step)
    model_state = distributed.full_model_state(model)
    if ctx.is_main:
        result.export = os.path.join(config.output_dir, "mae_pretrain.pth")
        checkpointing.atomic_save({"model": model_state, "args": config.to_dict()}, result.export)
        if config.visualize and result.history:
            save_loss_curve(result.history, os.path.join(config.output_dir, "loss_curve.png"))
    distributed.barrier(ctx)
    return result


def _check_run_folder(
    config: TrainConfig, ckpt_dir: str, resume: checkpointing.ResumePoint | None
) -> list[str]:
    """Refuse a run that would damage ``ckpt_dir``'s run; returns the checkpoints it replaces: for a fresh
    run (with ``overwrite``) all of them, for a resume the unreadable newer ones auto-resume skipped and (with
    ``overwrite``) those a later continuation wrote."""
    found = checkpointing.list_checkpoints(ckpt_dir)
    if resume is None:
        if found and not config.overwrite:
            raise FileExistsError(
                f"{ckpt_dir} already holds checkpoints of another run: resume it (--resume), choose another "
                "--output-dir, or pass --overwrite to replace them"
            )
        return found
    try:
        saved = TrainConfig.from_dict(resume.state["config"]).to_dict()
    except (TypeError, ValueError) as error:
        raise ValueError(f"resume: {resume.path} holds a config this version cannot read: {error}") from error
    conflicts = checkpointing.resume_conflicts(saved, config.to_dict())
    if conflicts:
        raise ValueError(
            f"resume: {resume.path} was trained with other settings ({'; '.join(conflicts)}), which a resume "
            "cannot change (it may change only the length of the run, with epochs / max_steps, and how it "
            "executes and reports): drop them, or start a fresh run in another --output-dir"
        )
    same_folder = os.path.samefile(os.path.dirname(os.path.abspath(resume.path)), ckpt_dir) if found else False
    replaced = [path for path in found if not (same_folder and checkpointing.checkpoint_step(path) <= resume.step)]
    valuable = [path for path in replaced if path not in resume.skipped]  # unreadable ones are not worth keeping
    if valuable and not config.overwrite:
        raise FileExistsError(
            f"resume: continuing from {resume.path} (step {resume.step}) would replace the checkpoints "
            f"{', '.join(os.path.basename(p) for p in valuable)} in {ckpt_dir}: pass --overwrite to drop them, "
            "resume the newest (--resume), or choose another --output-dir"
        )
    return replaced


def _drop_outputs_after(output_dir: str, replaced: list[str], step: int) -> None:
    """Remove the ``replaced`` checkpoints and the reconstruction pictures of steps after ``step``."""
    pictures = os.path.join(output_dir, "vis")
    names = os.listdir(pictures) if os.path.isdir(pictures) else []
    for name in names:
        picture_step = name.removeprefix("reconstruction-").removesuffix(".png")
        if name.startswith("reconstruction-") and picture_step.isdigit() and int(picture_step) > step:
            replaced = [*replaced, os.path.join(pictures, name)]
    for path in replaced:
        os.remove(path)


def _decodes_on_device(config: TrainConfig, device: torch.device) -> bool:
    """ImageFolder data through the bytes pipeline (decode and augment where the model runs): by default on a
    GPU, on the CPU when asked with decode_on="device". The embedded Fashion-MNIST subset (uint8 already)
    augments where the model runs unless decode_on="cpu". Both give the same batches up to resampling."""
    if config.data == "fashion-mnist":
        return config.decode_on != "cpu"
    if config.data != "imagefolder":
        return False
    return config.decode_on == "device" or (config.decode_on is None and device.type == "cuda")


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting ("auto": bf16 on GPUs, none on the CPU), or None for fp32."""
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _grad_norm(params: list[torch.nn.Parameter], clip: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients (clipped to ``clip`` when given), as a plain device tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip, total)
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def _say(ctx: distributed.DistContext, message: str) -> None:
    if ctx.is_main:
        print(message, flush=True)


def _vis_batch(config: TrainConfig, train_data, model) -> dict:
    """Fixed images (no augmentation) and fixed mask noise for the reconstruction pictures."""
    generator = torch.Generator().manual_seed(config.seed)
    if train_data.source is None:
        imgs = torch.randn(config.num_vis, model.in_chans, *model.img_size, generator=generator)
        mean, std = (0.0,) * model.in_chans, (1.0,) * model.in_chans
    else:
        source = train_data.source
        with contextlib.suppress(ValueError, FileNotFoundError):
            source = data.build_source(config, "test")
        imgs, _ = next(data.eval_batches(source, model.img_size[0], config.num_vis))
        mean, std = source.mean, source.std
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=generator)
    return {"imgs": imgs, "noise": noise, "mean": mean, "std": std}


def _save_pictures(config: TrainConfig, model_state: dict, vis_batch: dict, step: int) -> None:
    """The reconstruction grid of ``vis_batch``, from a CPU copy of the weights (works for any sharding)."""
    cpu_config = TrainConfig.from_dict({**config.to_dict(), "device": "cpu"})
    snapshot = build_model(cpu_config, torch.device("cpu"))
    snapshot.load_state_dict(model_state)
    path = os.path.join(config.output_dir, "vis", f"reconstruction-{step:08d}.png")
    save_reconstruction_grid(
        snapshot, vis_batch["imgs"], vis_batch["noise"], vis_batch["mean"], vis_batch["std"], config.mask_ratio, path
    )
