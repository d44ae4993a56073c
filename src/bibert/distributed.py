"""One process or many under `torchrun`: rank, device and the few collectives training needs.

The same training code runs as a plain process (world size 1, nothing initialised) or
under `torchrun --nproc_per_node N` (reads RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU,
nccl on GPU). Only rank 0 writes files and logs. Left out: multi-node launch details
beyond what torchrun's environment provides, and model-parallel schemes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import BibertError


@dataclass
class DistContext:
    """Where this process stands: rank among world_size processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # True when setup() initialised the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU if there is one, else the CPU; "cuda" under torchrun ->
    cuda:LOCAL_RANK; anything else is passed to torch.device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise BibertError(f"unknown device {device!r} ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BibertError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a GPU with bf16 support, or a CPU with
    AVX512-BF16 or AMX (where oneDNN runs bf16 products in hardware; elsewhere bf16 is emulated
    and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where `has_native_bf16(device)`, else "fp32"; fp32 and bf16 stay."""
    if precision == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    return precision


def setup(device: str = "auto") -> DistContext:
    """Read torchrun's environment, pick the device and join the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        owns = True
    return DistContext(rank, world, local_rank, dev, owns)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of x over all processes (x itself in a single process)."""
    if not ctx.distributed:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / ctx.world_size


def all_gather_objects(obj, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
