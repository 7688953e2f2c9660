"""One way to join (or make) a process group, whoever launched us: torchrun, the deepspeed launcher, mpirun
or plain python.

- torchrun / deepspeed launcher: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are in the environment.
- mpirun (Open MPI, MPICH, Intel MPI): rank and size come from mpi4py; rank 0 picks the rendezvous address
  and a free port and broadcasts them, then everything goes on as under torchrun.
- plain python: a group of one on 127.0.0.1 and a free port, so the same training code runs everywhere.

The backend is nccl on CUDA and gloo on CPU unless asked otherwise.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "launched_by_mpi"]

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    launcher: str  # "env" (torchrun, deepspeed launcher), "mpi" or "single"


def launched_by_mpi() -> bool:
    return "RANK" not in os.environ and any(v in os.environ for v in _MPI_RANK_VARS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpi_environment() -> None:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError("launched by mpirun but mpi4py is not installed: pip install mpi4py "
                           "(it needs an MPI implementation, e.g. Debian's libopenmpi-dev)") from exc
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if size == 1 else socket.gethostbyname(socket.gethostname()))
        port = int(os.environ.get("MASTER_PORT") or _free_port())
    else:
        addr = port = None
    addr, port = comm.bcast((addr, port), root=0)
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK") or os.environ.get("MPI_LOCALRANKID") or "0"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=local, MASTER_ADDR=addr,
                      MASTER_PORT=str(port))


def init_distributed(backend: str | None = None, device: str | None = None) -> DistInfo:
    """Initialize torch.distributed (once) from whatever launched this process; returns who we are."""
    if "RANK" in os.environ:
        launcher = "env"  # torchrun or the deepspeed launcher set RANK, WORLD_SIZE, MASTER_ADDR
    elif launched_by_mpi():
        _mpi_environment()
        launcher = "mpi"
    else:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
        launcher = "single"
    os.environ.setdefault("LOCAL_RANK", "0")
    if backend is None:
        use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ["LOCAL_RANK"]),
                    backend=dist.get_backend(), launcher=launcher)
