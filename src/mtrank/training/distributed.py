"""Data-parallel training over processes launched by ``torchrun``: process group, device and row shards.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in
each. :func:`distributed_session` reads them, joins the process group (gloo on CPU, NCCL on CUDA)
and leaves it at the end. The trainer then wraps the model in ``DistributedDataParallel``, and every
rank reads its own part of each epoch through :func:`epoch_steps` and :func:`shard_range`.

Row sharding: every rank draws the same seeded permutation of the training rows and cuts it into
global batches of ``batch_size * world_size`` rows, so all ranks run the same number of steps. Each
global batch is split into ``world_size`` contiguous parts whose sizes differ by at most one row.
The union of the parts over ranks and steps is every row exactly once per epoch. Equal step counts
were chosen over DDP's ``join``: the loss balancers run their own collectives at every step, which
``join`` cannot shadow for a rank that has run out of batches. A last global batch too small to
give every rank ``min_rows_per_rank`` rows is merged into the one before it.

Example:
    >>> generator = torch.Generator().manual_seed(0)
    >>> steps = epoch_steps(9, batch_size=2, world_size=2, generator=generator)
    >>> [len(step) for step in steps]  # 4 + 4 + 1 rows: the last row joins the step before it
    [4, 5]
    >>> shard_range(len(steps[1]), world_size=2, rank=1)
    (3, 5)
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar, get_args

import torch
import torch.distributed as dist

from mtrank.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DeviceChoice = Literal["auto", "cpu", "cuda"]
DEVICE_CHOICES: tuple[str, ...] = get_args(DeviceChoice)
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# How long a rank waits for the others at a collective before it fails, instead of torch's 30-minute
# default for gloo. Evaluating a large validation split on rank 0 must fit in it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)

Value = TypeVar("Value")


class LaunchEnvironment(NamedTuple):
    """The ranks ``torchrun`` sets in a worker's environment."""

    rank: int
    local_rank: int
    world_size: int


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a data-parallel run. A single process is rank 0 of a world of 1.

    Attributes:
        rank: global rank, ``0 .. world_size - 1``. Rank 0 writes the run directory.
        local_rank: rank on this machine, which selects the CUDA device.
        world_size: number of processes.
        device: the device this process trains on.
        backend: ``gloo`` or ``nccl``, or ``None`` without a process group.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        """Whether more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0


def read_launch_environment(environ: Mapping[str, str] | None = None) -> LaunchEnvironment | None:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as ``torchrun`` sets them.

    Args:
        environ: the environment to read, ``os.environ`` by default.

    Returns:
        The ranks, or ``None`` when none of the three variables is set.

    Raises:
        ConfigError: only some of the variables are set, one is not an integer, or the ranks are
            out of range.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return None
    problems = [
        f"environment variable {name} is missing while {', '.join(present)} is set. Launch with "
        "`torchrun`, which sets RANK, WORLD_SIZE and LOCAL_RANK, or unset all three"
        for name in LAUNCH_VARIABLES
        if name not in environ
    ]
    values: dict[str, int] = {}
    for name in present:
        try:
            values[name] = int(environ[name])
        except ValueError:
            problems.append(f"environment variable {name} must be an integer, got {environ[name]!r}")
    if problems:
        raise ConfigError(problems)
    launch = LaunchEnvironment(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise ConfigError(
            [
                f"invalid torchrun ranks: RANK={launch.rank}, LOCAL_RANK={launch.local_rank}, "
                f"WORLD_SIZE={launch.world_size}. Expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
            ]
        )
    return launch


def select_device(local_rank: int, choice: DeviceChoice = "auto") -> torch.device:
    """Pick the device of the process with ``local_rank``: ``cuda:LOCAL_RANK`` or the CPU.

    Args:
        local_rank: the process's rank on its machine.
        choice: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.

    Raises:
        ConfigError: ``choice`` is unknown, or ``cuda`` is requested but this machine has fewer than
            ``local_rank + 1`` CUDA devices.
    """
    if choice not in DEVICE_CHOICES:
        raise ConfigError([f"device must be one of {', '.join(DEVICE_CHOICES)}, got {choice!r}"])
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "cpu" or (choice == "auto" and available == 0):
        return torch.device("cpu")
    if local_rank >= available:
        raise ConfigError(
            [
                f"LOCAL_RANK={local_rank} needs CUDA device {local_rank}, but {available} CUDA device(s) "
                "are visible. Start at most that many processes per machine (--nproc-per-node) or train on CPU"
            ]
        )
    return torch.device("cuda", local_rank)


def current_context() -> DistributedContext:
    """Return this process's context from the initialised process group, or the single-process one.

    Raises:
        ConfigError: ``torchrun`` set ``WORLD_SIZE`` above 1 but no process group is initialised, so
            the processes would train separately and overwrite each other's files.
    """
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend())
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        launch = read_launch_environment()
        local_rank = launch.local_rank if launch is not None else (device.index or 0)
        return DistributedContext(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)
    launch = read_launch_environment()
    if launch is not None and launch.world_size > 1:
        raise ConfigError(
            [
                f"this process was launched as rank {launch.rank} of WORLD_SIZE={launch.world_size}, but no "
                "process group is initialised. Train with `mtrank train` or `train_run`, which join it, "
                "or call `mtrank.training.distributed.init_distributed()` first"
            ]
        )
    return DistributedContext()


def init_distributed(
    device: DeviceChoice = "auto", *, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT
) -> DistributedContext:
    """Join the process group of a ``torchrun`` launch: gloo on CPU, NCCL on CUDA.

    Without launch variables, or with ``WORLD_SIZE=1``, no group is created and the single-process
    context is returned. When the group already exists, its context is returned unchanged.

    When rank 0 hosts the rendezvous store itself (torchrun started with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) and ``MASTER_ADDR`` is a loopback address, the store
    listens on that address only, instead of on every interface as ``torch.distributed.TCPStore``
    does by default.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``, as in :func:`select_device`.
        timeout: how long a collective waits for the other ranks.

    Returns:
        The context of this process.

    Raises:
        ConfigError: the launch variables or the device choice are invalid.
    """
    if dist.is_available() and dist.is_initialized():
        return current_context()
    launch = read_launch_environment()
    if launch is None and device == "cuda":
        raise ConfigError(
            [
                "device `cuda` needs a torchrun launch, one process per GPU (for one GPU: "
                "`torchrun --nproc-per-node 1 -m mtrank train ...`); a process started without torchrun "
                "trains on the CPU"
            ]
        )
    if launch is None or (launch.world_size == 1 and device != "cuda"):
        # One process trains exactly as without torchrun, on the CPU. With device `cuda`, a
        # one-process group is created below so that the run uses the GPU.
        return DistributedContext()
    if not dist.is_available():
        raise ConfigError(
            ["this PyTorch build was compiled without torch.distributed; install a build that includes it"]
        )
    chosen = select_device(launch.local_rank, device)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    store = _loopback_store(launch, timeout)
    if store is not None:
        dist.init_process_group(
            backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=timeout
        )
    else:
        dist.init_process_group(
            backend, init_method="env://", rank=launch.rank, world_size=launch.world_size, timeout=timeout
        )
    context = DistributedContext(launch.rank, launch.local_rank, launch.world_size, chosen, backend)
    if context.is_main:
        logger.info(
            "distributed training: %d processes, backend %s, rank 0 on %s",
            context.world_size,
            backend,
            chosen,
        )
    return context


def _loopback_store(launch: LaunchEnvironment, timeout: datetime.timedelta) -> dist.TCPStore | None:
    """Return a TCP store bound to a loopback ``MASTER_ADDR``, or ``None`` to let torch create one.

    torchrun's agent hosts the store unless ``TORCHELASTIC_USE_AGENT_STORE`` is ``False``. Only then
    does rank 0 start a server, and only a loopback address is bound here: another address may not be
    one of this machine's.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    address = os.environ.get("MASTER_ADDR", "")
    port_text = os.environ.get("MASTER_PORT", "")
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = address == "localhost"
    if not loopback or not port_text.isdigit():
        return None
    host = "127.0.0.1" if address == "localhost" else address
    listen_fd = None
    # NOTE: torchrun picks MASTER_PORT by binding and releasing a free port, so another process can
    # take it before rank 0 binds it here. The launch then fails with "Address already in use".
    if launch.rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, int(port_text)))
        server.listen()
        # The store takes over the listening socket and closes it when it is destroyed.
        listen_fd = server.detach()
    return dist.TCPStore(
        host,
        int(port_text),
        launch.world_size,
        is_master=launch.rank == 0,
        timeout=timeout,
        master_listen_fd=listen_fd,
    )


def destroy_distributed() -> None:
    """Leave the process group after a barrier, or do nothing without one."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


@contextmanager
def distributed_session(device: DeviceChoice = "auto") -> Iterator[DistributedContext]:
    """Join the process group of a ``torchrun`` launch for the block, and leave it afterwards.

    A group that already existed before the block is used and left open, so a caller that
    initialised it keeps control of it.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``, as in :func:`select_device`.

    Yields:
        The context of this process, or the single-process context outside ``torchrun``.
    """
    if dist.is_available() and dist.is_initialized():
        yield current_context()
        return
    context = init_distributed(device)
    try:
        yield context
    except BaseException:
        if context.is_distributed:
            # No barrier: the other ranks may be waiting in another collective or have failed too.
            dist.destroy_process_group()
        raise
    if context.is_distributed:
        destroy_distributed()


def is_main_process() -> bool:
    """Return whether this process is rank 0.

    Without a process group, the ``RANK`` variable set by ``torchrun`` decides, so the result stays
    correct after :func:`distributed_session` has left the group. A process started without
    ``torchrun`` is the main process.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    rank = os.environ.get("RANK", "0")
    return not rank.isdigit() or int(rank) == 0


def barrier() -> None:
    """Wait until every rank reaches this call, or return at once without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(value: Value, source: int = 0) -> Value:
    """Return rank ``source``'s ``value`` (sent pickled) on every rank, or ``value`` without a group.

    Every rank must call it at the same point, as with any collective.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    holder: list[Any] = [value]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(holder, src=source, device=device)
    return holder[0]


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order, where ranks may hold different row counts.

    Args:
        local: ``(n_r, ...)`` this rank's rows, on the device of the process group's backend.

    Returns:
        ``(sum_r n_r, ...)`` on every rank, rank 0's rows first, or ``local`` itself without a group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    world_size = dist.get_world_size()
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))  # (max_r n_r, ...)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)


def shard_range(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Return rank ``rank``'s contiguous part ``[start, stop)`` of ``num_rows`` rows.

    The first ``num_rows % world_size`` ranks get one row more than the others, so part sizes differ
    by at most one and the parts cover the rows in order.

    Raises:
        ValueError: ``world_size`` is below 1 or ``rank`` is outside ``0 .. world_size - 1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in 0..{world_size - 1} for world size {world_size}, got {rank}")
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start, stop


def epoch_steps(
    num_rows: int,
    batch_size: int,
    world_size: int,
    *,
    generator: torch.Generator,
    min_rows_per_rank: int = 1,
) -> list[torch.Tensor]:
    """Cut one epoch's seeded permutation into global batches, one per training step.

    Every rank calls this with an identically seeded ``generator`` and takes its part of each step
    with :func:`shard_range`. The permutation is the one :func:`mtrank.data.tensors.iterate_batches`
    draws from the same generator, so with one process the steps are its batches.

    Args:
        num_rows: N, the rows of the split.
        batch_size: B, the rows per rank per step.
        world_size: W, the number of ranks.
        generator: the seeded generator of the permutation.
        min_rows_per_rank: the minimum rows of each rank in each step (2 for batch norm).

    Returns:
        Index tensors ``(G_k,)`` into the split, int64. ``G_k = B * W`` except for the last step. A
        last remainder below ``W * min_rows_per_rank`` rows is appended to the step before it.

    Raises:
        ValueError: ``batch_size``, ``world_size`` or ``min_rows_per_rank`` is below 1.
        DataError: ``num_rows < world_size * min_rows_per_rank``, so some rank would get too few rows.
    """
    if batch_size < 1 or world_size < 1 or min_rows_per_rank < 1:
        raise ValueError(
            "`batch_size`, `world_size` and `min_rows_per_rank` must be at least 1, got "
            f"{batch_size}, {world_size} and {min_rows_per_rank}"
        )
    needed = world_size * min_rows_per_rank
    if num_rows < needed:
        raise DataError(
            f"the training split has {num_rows} rows, but {world_size} processes need at least {needed} "
            f"({min_rows_per_rank} per process and step). Use fewer processes or more data"
        )
    order = torch.randperm(num_rows, generator=generator)
    steps = list(torch.split(order, batch_size * world_size))
    if len(steps) > 1 and len(steps[-1]) < needed:
        remainder = steps.pop()
        steps[-1] = torch.cat([steps[-1], remainder])
    return steps
