"""Several processes, one run: torchrun starts one process per GPU (or CPU processes with gloo).

Each rank takes every world-th row of the global batch and divides its loss sum by the global token
count times world (DDP averages gradients): the same gradient as one process.
"""
import os

import torch
import torch.distributed as dist

from utils import pick_device


def setup_distributed(config):
    """(rank, world size, device). One process: (0, 1, train.device)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, pick_device(config.train.device)
    use_cuda = torch.cuda.is_available() and config.train.device in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def broadcast_flag(value: bool, world: int) -> bool:
    """Rank 0's value of a flag (stop early, say), on every rank."""
    if world == 1:
        return value
    flag = torch.tensor([float(value)])
    dist.broadcast(flag, 0)
    return bool(flag.item())


def wrap(model, device, world: int):
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shutdown(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
