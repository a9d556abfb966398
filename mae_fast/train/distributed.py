"""torchrun support: process group set-up (NCCL on GPUs, gloo on CPUs), DDP or FSDP2 wrapping, and the
state-dict helpers that work the same for one process, DDP and FSDP2."""

from __future__ import annotations

import gc
import logging
import os
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> DistContext:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        initialized_here = True
    return DistContext(rank, world_size, local_rank, initialized_here)


#: Weak references to the process groups :func:`teardown` destroyed (see :func:`exit_if_a_group_outlived`).
_destroyed_groups: list[weakref.ref] = []


def teardown(ctx: DistContext) -> None:
    """Destroy the process group :func:`setup` created, so that its gloo worker threads are joined now.

    The group's last owners must go first: DDP's reducer and FSDP2's hooks hold it in reference cycles, which
    only the cycle collector frees. Left to the interpreter's shutdown, a gloo worker thread that drops a
    finished collective (and the Python tensors it holds) after shutdown has begun aborts the process with
    "terminate called without an active exception". Under FSDP2 the group outlives even this, held by the
    DeviceMesh that DTensor's caches keep; :func:`exit_if_a_group_outlived` ends such a process safely.
    """
    if ctx.initialized_here and dist.is_initialized():
        group = weakref.ref(dist.group.WORLD)
        gc.collect()
        dist.destroy_process_group()
        _destroyed_groups.append(group)


def exit_if_a_group_outlived(code: int) -> None:
    """End this process with ``code`` at once, its output flushed, when a process group :func:`teardown`
    destroyed is still alive.

    Such a group's gloo worker threads live until the interpreter's shutdown frees it, and one that releases
    its last collective while the shutdown runs aborts the process after the work is done. The command line
    calls this after its subcommand returned: every file it writes is closed by then (checkpoints and
    exports are written atomically), so skipping the interpreter's shutdown loses nothing.
    """
    if not any(group() is not None for group in _destroyed_groups):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wrap(model: nn.Module, ctx: DistContext, sharding: str, device: torch.device) -> nn.Module:
    """DDP (``sharding="ddp"``) or FSDP2 ``fully_shard`` per transformer block and at the root."""
    if not ctx.distributed:
        return model
    if sharding == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in list(model.blocks) + list(model.decoder_blocks):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state_dict, optimizer state_dict), whole and on the CPU; collective under FSDP2.

    One format for one process, DDP and FSDP2 (torch.distributed.checkpoint's full state dicts: the
    optimizer's state keyed by parameter name), so a checkpoint resumes under any sharding and any number
    of processes. Under FSDP2 only rank 0 gets the tensors (the others get empty dicts).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def full_model_state(model: nn.Module) -> dict:
    """The model's part of :func:`full_state` alone (no copy of the optimizer's state)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer, model_state: dict, optim_state: dict) -> None:
    """Inverse of :func:`full_state` (every rank passes the whole state)."""
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


def all_gather_objects(obj, ctx: DistContext) -> list:
    if not ctx.distributed:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def sum_tensor(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks (in place on a copy); the input itself when not distributed."""
    if not ctx.distributed:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
