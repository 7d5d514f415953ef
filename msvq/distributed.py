"""Several processes under torchrun: process group, each rank's rows, gathers and launch.

msvq runs one process per device. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE, and
``process_group`` joins the group (NCCL on GPUs, gloo on CPUs). A process started
without them is a group of one, and every function here is then a no-op.

Rows of a global batch. Every rank draws the same global batch order and the same
random augmentation parameters, then keeps one contiguous block of the batch: rank r
of W keeps rows [r * b, (r + 1) * b), with b = B / W. This works like torch's
DistributedSampler with drop_last and a per-epoch seed, except that torch's sampler
interleaves ranks (rank r gets rows r, r + W, ...). Contiguous blocks keep every
SplitBatchNorm chunk of B / bn_splits samples whole within one rank, so each chunk
holds the same samples for any number of processes. Gathering per-rank results in
rank order then rebuilds the global batch in its single-process order.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from msvq.config import ParamsError
from msvq.device import DeviceError, select_device

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group: rank, local rank and world size."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when several processes share the work."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that logs progress and writes files."""
        return self.rank == 0


SINGLE_PROCESS = Ranks()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def env_ranks() -> Ranks:
    """Return the ranks torchrun set in the environment (a single process when unset)."""
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    return Ranks(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


@contextmanager
def process_group(device_request: str) -> Iterator[tuple[Ranks, torch.device]]:
    """Join the torchrun process group for the block and yield (ranks, this rank's device).

    Each rank uses GPU LOCAL_RANK on a CUDA device. The group is destroyed when the
    block ends, also after an error.
    """
    ranks = env_ranks()
    device = select_device(device_request)
    if not ranks.enabled:
        yield ranks, device
        return
    exit_with_parent()

    if device.type == "cuda":
        available = torch.cuda.device_count()
        if ranks.local_rank >= available:
            raise DeviceError(
                f"local rank {ranks.local_rank} needs GPU {ranks.local_rank}, but this node has {available}; "
                f"start at most {available} processes per node (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend)
    log.info("rank %d of %d on %s (%s backend)", ranks.rank, ranks.world_size, device, backend)
    try:
        yield ranks, device
    finally:
        if created:
            dist.destroy_process_group()


def rank_rows(total: int, ranks: Ranks, device: torch.device | str | None = None) -> Tensor:
    """Return the indices (int64, on ``device``) of this rank's rows among ``total`` global rows.

    Each rank gets ceil(total / W) consecutive rows. When ``total`` does not divide, the
    last ranks repeat row total - 1 to fill their share, and ``gather_rows`` drops the
    repeats, so every rank runs the same number of rows and never zero.
    """
    per_rank = -(-total // ranks.world_size)
    start = ranks.rank * per_rank
    return torch.arange(start, start + per_rank, device=device).clamp_(max=total - 1)


def gather_rows(rows: Tensor, total: int, ranks: Ranks) -> Tensor:
    """Concatenate every rank's ``rows`` in rank order and return the first ``total``.

    ``rows`` are the results for this rank's ``rank_rows(total)``, equally many on every
    rank. The result carries no gradient.
    """
    if not ranks.enabled:
        return rows[:total]
    rows = rows.contiguous()
    parts = [torch.empty_like(rows) for _ in range(ranks.world_size)]
    dist.all_gather(parts, rows)
    return torch.cat(parts)[:total]


def average_(tensors: Sequence[Tensor], ranks: Ranks) -> None:
    """Replace each tensor with its mean over ranks, in one all-reduce; all must share a dtype."""
    if not ranks.enabled or not tensors:
        return
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(flat)
    flat /= ranks.world_size
    for tensor, mean in zip(tensors, flat.split([tensor.numel() for tensor in tensors])):
        tensor.copy_(mean.view_as(tensor))


def max_over_ranks(value: Tensor, ranks: Ranks) -> Tensor:
    """Return the elementwise maximum of ``value`` over ranks."""
    if not ranks.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def broadcast_object(value, ranks: Ranks):
    """Return rank 0's ``value`` on every rank (any picklable object)."""
    if not ranks.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def check_divisible(key: str, value: int, ranks: Ranks) -> None:
    """Raise ParamsError unless the params value ``key`` = ``value`` divides by the number of processes."""
    if value % ranks.world_size:
        raise ParamsError(
            f"{key} = {value} does not divide by the {ranks.world_size} processes (WORLD_SIZE); "
            f"choose a {key} that does, or another number of processes"
        )


def torchrun_args(nproc: int, argv: Sequence[str]) -> list[str]:
    """Return torchrun's arguments that run ``msvq ARGV`` as ``nproc`` processes on this node.

    ``--standalone`` picks a free local port, so several such jobs can share a machine.
    """
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "msvq.cli", *argv]


def threads_per_process(nproc: int) -> int:
    """Return the CPU threads of each of ``nproc`` processes: OMP_NUM_THREADS (or all cores) split among them."""
    budget = os.environ.get("OMP_NUM_THREADS", "")
    total = int(budget) if budget.isdigit() and int(budget) > 0 else os.cpu_count() or 1
    return max(1, total // nproc)


def run_torchrun(nproc: int, argv: Sequence[str], device_request: str) -> None:
    """Run ``msvq ARGV`` as ``nproc`` processes on this node under torchrun's launcher, and wait.

    The launcher runs in this process, so its workers stop with it. The launcher handles
    SIGINT and SIGTERM, and each worker has the kernel kill it when this process dies
    (``exit_with_parent``). Raises DeviceError first when CUDA is requested (or chosen
    by auto) and this node has fewer than ``nproc`` GPUs, SignalException on a signal
    and ChildFailedError when a worker fails, after all workers have stopped.
    """
    from torch.distributed.run import get_args_parser, run

    device = select_device(device_request)
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise DeviceError(
            f"{nproc} processes need {nproc} GPUs, but this node has {torch.cuda.device_count()}; "
            "lower nproc in the params file or use more GPUs"
        )
    if device.type == "cpu" and nproc > (os.cpu_count() or 1):
        log.warning("starting %d processes on %d CPU cores; each process will be slow", nproc, os.cpu_count())
    # The workers inherit the environment. Without this, torchrun would give each one
    # thread, and Snakemake's OMP_NUM_THREADS (the job's threads) would go to each process.
    os.environ["OMP_NUM_THREADS"] = str(threads_per_process(nproc))
    args = torchrun_args(nproc, argv)
    log.info("starting %d processes under torchrun (%s threads each): torchrun %s", nproc,
             os.environ["OMP_NUM_THREADS"], " ".join(args))
    run(get_args_parser().parse_args(args))


def exit_with_parent() -> None:
    """Ask Linux to send this process SIGKILL when its parent (torchrun's launcher) dies.

    torchrun (torch 2.14) starts its workers in sessions of their own, so a launcher
    killed by SIGKILL or the out-of-memory killer would otherwise leave them training.
    A no-op where prctl is unavailable.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError) as error:
        log.warning("cannot tie this worker to its launcher (%s); it may outlive a killed launcher", error)
        return
    # The launcher may have died before prctl took effect; then init (pid 1) or a subreaper adopted this process.
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
