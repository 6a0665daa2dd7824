"""One process per rank: its device, the process group (NCCL on GPUs, else gloo) and the few collectives the
recipe uses (a barrier, an object broadcast from rank 0, a mean over ranks)."""

from __future__ import annotations

import datetime
import os

import torch

from heads.hardware import check_device, check_ranks_fit_gpus, is_auto, process_threads


def train_device(setting) -> torch.device:
    """auto: this rank's GPU when CUDA is available (NCCL needs one GPU per rank), else the CPU."""
    if is_auto(setting):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        check_ranks_fit_gpus()
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    device = check_device(setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_distributed(device: torch.device, threads=None):
    """Use the launcher's rank variables (torchrun, deepspeed) or make a world of one: NCCL on this rank's
    GPU (made the current device first: NCCL's collectives and object broadcasts use it), else gloo."""
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(hours=2)  # rank 0 may generate data for a while
    own_world = int(os.environ.get("WORLD_SIZE", "1")) == 1  # no launcher's rendezvous is needed for one rank
    if own_world:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("LOCAL_RANK", "0")  # a launcher's own (train_device chose the GPU by it) stands
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # one process per core share, or they fight over the cores
        torch.set_num_threads(process_threads(threads, int(os.environ["LOCAL_WORLD_SIZE"])))
    if own_world and not torch.distributed.is_initialized():
        # The store binds a free port itself: a port picked first could be taken by another run before the bind.
        store = torch.distributed.TCPStore("127.0.0.1", 0, 1, True, timeout=timeout, wait_for_workers=False)
        os.environ["MASTER_PORT"] = str(store.port)
        torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)  # adopts a group made here
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def barrier():
    if torch.distributed.get_backend() == "nccl":  # name the GPU, or NCCL guesses one per rank
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def reduce_mean(stats: torch.Tensor, world: int) -> torch.Tensor:
    """The mean over ranks, in place on the tensor's own device (NCCL takes GPU tensors only)."""
    if world > 1:
        torch.distributed.all_reduce(stats)
        stats /= world
    return stats
