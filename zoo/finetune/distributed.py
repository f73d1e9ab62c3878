"""One or many processes: torchrun's environment, PyTorch's process group and DistributedDataParallel.

``torchrun --nproc_per_node=N -m zoo.finetune ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; each process then joins
the process group (NCCL on CUDA, gloo on CPU), takes its share of every epoch through a DistributedSampler, and
wraps the model in DistributedDataParallel. Rank 0 alone logs and writes files.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ['Processes', 'join_processes', 'leave_processes', 'sum_over_processes']


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run, and its device."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_processes() -> Processes:
    """Join the process group that torchrun describes in the environment, or run alone."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return Processes(0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo')
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def sum_over_processes(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` summed over the process group (reduced on ``device``: NCCL reduces only GPU tensors), on its own
    device; ``tensor`` itself outside a process group."""
    if not dist.is_initialized():
        return tensor
    reduced = tensor.to(device, copy=True)
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)


def leave_processes(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()
