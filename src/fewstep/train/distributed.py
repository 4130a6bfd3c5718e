"""Data-parallel training with plain torch.distributed (gloo on CPU, NCCL on GPUs), launched by torchrun.

Launch (2 CPU processes):
    torchrun --standalone --nproc_per_node 2 -m fewstep.cli train --config run.toml
`accelerate launch --multi_gpu --num_processes 2 -m fewstep.cli train ...` also works (it sets the same
environment variables); note `accelerate launch --cpu` starts only one process. Every rank draws the same global
batch (same seeds) and trains on its slice; DistributedDataParallel (Li et al., 2020, "PyTorch Distributed")
averages the gradients, so the run equals a 1-process run with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size; rank 0 writes checkpoints, plots and the progress bar."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of n items (n must divide evenly)."""
        if n % self.world_size:
            raise ValueError(f"batch_size={n} must be divisible by the number of processes ({self.world_size})")
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over all ranks (the tensor itself with one process)."""
        if not self.enabled:
            return value
        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world_size


def init_distributed() -> DistContext:
    """Join the process group when started by torchrun/accelerate (WORLD_SIZE > 1), else a 1-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("FEWSTEP_BACKEND") != "gloo" else "gloo"
        if backend == "nccl":  # before the group exists: else every rank's NCCL communicator lands on cuda:0
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size())


def finish_distributed(ctx: DistContext) -> None:
    """Wait for all ranks and leave the process group."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
