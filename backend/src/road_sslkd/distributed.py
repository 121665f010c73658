"""Training on several GPUs or machines with torch.distributed, under ``torchrun ... road-sslkd train``.

torchrun puts RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in each process's environment.
Without them (WORLD_SIZE absent or 1) every helper here is a no-op and training is one process, unchanged.
With them:

- each rank samples its own random crops (its own seeds) and DistributedDataParallel averages gradients;
- ``wrap`` turns a stage's trainable modules and its loss into one DDP module, so every network call a stage
  makes, and every parameter it trains (adapters included), is synchronised without the stage knowing;
- only rank 0 writes the run folder and emits events on stdout (other ranks: errors only); the others wait
  for it at barriers. Later stages read earlier models from the run folder, so on several machines it must
  be on a shared file system.
"""

from __future__ import annotations

import atexit
import logging
import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from . import events

# Rank 0 alone evaluates on the test rasters and exports while the others wait at a barrier: allow for it.
TIMEOUT = timedelta(hours=2)
T = TypeVar("T")


def requested() -> bool:
    """Whether a launcher (torchrun) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: torch.device) -> torch.device:
    """``cuda`` becomes this process's GPU, cuda:LOCAL_RANK, under torchrun; anything else is kept."""
    if device.type == "cuda" and requested():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(device: torch.device) -> bool:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); False without torchrun."""
    if not requested():
        return False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # Bound to its GPU, NCCL need not guess the device of barriers (a wrong guess hangs).
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        atexit.register(dist.destroy_process_group)
    if not is_main():
        # One voice on stdout: the event stream is rank 0's; another rank only reports its own failure.
        events.redirect(lambda event, fields: event != "error")
        events.log.setLevel(logging.WARNING)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_first(build: Callable[[], T]) -> T:
    """``build()`` on rank 0, then on the other ranks: it may write files that they then read."""
    if is_main():
        built = build()
    barrier()
    if not is_main():
        built = build()
    return built


def rank_seed(seed: int) -> int:
    """A seed of this rank's own, so ranks draw different crops: ``seed`` itself on rank 0 and in one process."""
    return seed if rank() == 0 else int(np.random.SeedSequence((seed, rank())).generate_state(1)[0])


def _device() -> torch.device:
    """Where collective tensors live: nccl only moves CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any: a stop request must stop all ranks at the same step."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (training metrics: every rank saw a different batch)."""
    if not is_distributed():
        return values
    keys = sorted(values)  # the same order on every rank
    total = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    averaged = dict(zip(keys, (total / world_size()).tolist()))
    return {k: averaged[k] for k in values}


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class _StageStep(nn.Module):
    """A stage's trainable modules as one module whose forward is the stage's loss."""

    def __init__(self, modules: dict[str, nn.Module], losses: Callable[..., dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.trained = nn.ModuleDict(modules)
        self.losses = losses
        self.swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, name, plain batch norm)

    def forward(self, lab: dict, unl: Any) -> dict[str, torch.Tensor]:
        return self.losses(lab, unl)

    def sync_batch_norm(self) -> None:
        """Batch statistics over all ranks' samples (small per-GPU batches make noisy statistics)."""
        for parent in list(self.trained.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _BatchNorm):
                    # The converted module shares the parameters and running buffers, so optimiser and
                    # checkpoints see the same tensors and the same state_dict keys.
                    parent.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                    self.swapped.append((parent, name, child))


def wrap(modules: dict[str, nn.Module], losses: Callable[..., dict[str, torch.Tensor]],
         device: torch.device) -> Callable[..., dict[str, torch.Tensor]]:
    """What the training loop calls to compute a stage's loss terms.

    In one process that is ``losses`` itself. Under torchrun it is a DDP module holding every trainable
    module, whose forward is ``losses``: DDP then sees one forward per micro-step, however many times and
    however (``model(x)``, ``forward_features``) the stage calls its networks. Its parameters are broadcast
    from rank 0 here, and ``find_unused_parameters`` lets a stage leave some of them out of a step.
    """
    if not is_distributed():
        return losses
    step = _StageStep(modules, losses)
    if device.type == "cuda":  # SyncBatchNorm has no CPU kernels
        step.sync_batch_norm()
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def unwrap(forward: Callable[..., dict[str, torch.Tensor]]) -> None:
    """Put plain batch norm back after a stage, so its trained models need no process group."""
    if isinstance(forward, DistributedDataParallel):
        for parent, name, child in forward.module.swapped:
            parent.add_module(name, child)


def no_sync(forward: Callable[..., dict[str, torch.Tensor]], skip: bool) -> AbstractContextManager:
    """DDP's gradient all-reduce is skipped (``skip``) on the accumulation micro-steps before the last."""
    if skip and isinstance(forward, DistributedDataParallel):
        return forward.no_sync()
    return nullcontext()
