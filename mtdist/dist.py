"""The distributed environment as a frozen value, read once from the environment.

mtdist knows only the torch.distributed contract (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or its SLURM_* equivalents; a plain process is rank 0 of 1.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        if environ.get(name, "") != "":
            return int(environ[name])
    return default


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_master_addr(environ: Mapping[str, str]) -> str:
    nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
    # "node[1-2],x" -> "node1": the first node of a compressed list hosts rank 0
    head = nodes.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split("]")[0]
    return head


def dist_env_from_environ(environ: Mapping[str, str] | None = None) -> DistEnv:
    """torchrun / deepspeed-launcher variables first, then Slurm's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env:
        return DistEnv(
            rank=_int(env, "RANK", default=0),
            world_size=_int(env, "WORLD_SIZE", default=1),
            local_rank=_int(env, "LOCAL_RANK", default=0),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=0),
        )
    return DistEnv(
        rank=_int(env, "SLURM_PROCID", default=0),
        world_size=_int(env, "SLURM_NTASKS", default=1),
        local_rank=_int(env, "SLURM_LOCALID", default=0),
        master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(env),
        master_port=_int(env, "MASTER_PORT", default=29500 + _int(env, "SLURM_JOB_ID", default=0) % 20000),
    )


# Tests only: "1" applies model.channels_last on the CPU too, so that the CUDA path's NHWC inputs run
# where no GPU is (tests/test_cuda.py on the CPU, benchmarks/gpu_check.py --cpu).
NHWC_ON_CPU_ENV = "MTDIST_TEST_NHWC_ON_CPU"


def nhwc_inputs(channels_last: bool, device: torch.device) -> bool:
    """Whether input batches (so every activation) go NHWC: model.channels_last, on CUDA, where cuDNN's
    tensor-core convolutions want it (the weights stay NCHW: train.place_model)."""
    return channels_last and (device.type == "cuda" or os.environ.get(NHWC_ON_CPU_ENV) == "1")


def pick_device(env: DistEnv) -> torch.device:
    """cuda:<local rank>, or cuda:0 when Slurm/submitit already narrowed CUDA_VISIBLE_DEVICES to one GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    return torch.device("cuda", env.local_rank if env.local_rank < count else env.local_rank % count)


def export_env(env: DistEnv) -> DistEnv:
    """Write the contract back to os.environ (DeepSpeed reads it); a single process gets a free port."""
    port = env.master_port or free_port()
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(port),
    )
    return DistEnv(env.rank, env.world_size, env.local_rank, env.master_addr, port)


def init_process_group(env: DistEnv, backend: str = "auto", timeout_s: float = 900.0) -> torch.device:
    """nccl on CUDA, gloo on CPU; returns this rank's device."""
    device = pick_device(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        # 2 = CleanUpOnly: a failed or timed-out NCCL collective aborts the communicators and raises in
        # Python, where mtdist records the failure for the restart decision (mtdist.failures); torch's
        # default (3) ends the process from its watchdog thread, leaving no record. A value you set wins.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    if not torch_dist.is_initialized():
        env = export_env(env)
        torch_dist.init_process_group(
            backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return device


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def sum_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` summed elementwise over all ranks, on the CPU (`t` itself without a group or with one rank).

    Sent from `device`: nccl needs a device tensor. Counts belong in float64, where sums stay exact.
    """
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return t
    t = t.to(device)
    torch_dist.all_reduce(t)
    return t.cpu()
