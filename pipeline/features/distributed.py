"""torchrun ranks: which process this is, the device it runs on, and the few messages ranks exchange.

`urm extract` started by torchrun (``torchrun --nproc-per-node N ...``, single or multi node) finds
RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) in its environment. A process
without them, or with WORLD_SIZE=1, is a single process and never touches torch.distributed.

Ranks exchange only small Python objects (rank 0's view of the cache, each rank's counts) and wait
for each other at a barrier (at the end, and when rank 0 fails: then the other ranks print why they stop
before rank 0 may leave, since torchrun stops every rank as soon as one exits), so the process group is gloo on every machine, CUDA ones included:
gloo runs these on the host over TCP, where NCCL would stage every object through GPU memory and
its watchdog would stop a rank that waits longer than its timeout for a slower one. The GPUs
themselves never communicate: each rank runs its own copy of the backbone on cuda:LOCAL_RANK.
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

from pipeline.errors import AlreadyReported, UserError

logger = logging.getLogger(__name__)

# How long a rank waits at a collective for the others: the slowest rank's remaining parts (about
# one part's worth with balanced shares) plus rank 0's resume check of an existing cache.
TIMEOUT = _dt.timedelta(hours=2)
T = TypeVar("T")


class RankError(UserError):
    """Another rank failed, or contact with the other ranks was lost."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of one run (0 of 1 for a plain process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def ranks_from_env(environ=None) -> Ranks:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; a single process without them."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return Ranks()
    try:
        ranks = Ranks(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise RankError(f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, LOCAL_RANK="
                        f"{env.get('LOCAL_RANK')!r} must be whole numbers (torchrun sets them)") from None
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
        raise RankError(f"RANK={ranks.rank}, WORLD_SIZE={ranks.world_size}, LOCAL_RANK={ranks.local_rank}: "
                        "need 0 <= RANK < WORLD_SIZE (torchrun sets them)")
    return ranks


def rank_device(device: str, ranks: Ranks) -> str:
    """The device of this rank: cuda:LOCAL_RANK for auto (with CUDA) and cuda; a single process keeps its own."""
    if not ranks.distributed or device in ("cpu", "mps"):
        return device
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if device not in ("auto", "cuda"):
        raise RankError(f"--device {device} names one device for every rank: under torchrun each rank takes "
                        "cuda:LOCAL_RANK, so give --device cuda (or auto, or cpu)")
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise RankError(f"{ranks} has LOCAL_RANK {ranks.local_rank} but this node has {count} CUDA device(s): "
                        "--nproc-per-node must not exceed the GPUs per node")
    torch.cuda.set_device(ranks.local_rank)
    return f"cuda:{ranks.local_rank}"


def start(ranks: Ranks) -> None:
    """Join the other ranks (gloo; MASTER_ADDR / MASTER_PORT from torchrun); nothing for a single process."""
    if ranks.distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=TIMEOUT)


def stop(ranks: Ranks) -> None:
    """Leave the process group (if this process joined one)."""
    import torch.distributed as dist

    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # the group's threads end now, not during interpreter exit (where gloo's abort)


def from_main(ranks: Ranks, compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its result sent to every rank; an error there stops every rank.

    Rank 0 raises its own error; the others print an error line saying rank 0 failed (its own error line
    says why) and raise ``AlreadyReported``, so no rank waits for a result that will not come. Rank 0 waits at a
    barrier until they have printed it: once rank 0 exits, torchrun stops the other ranks at once (SIGTERM), and a
    rank slower than rank 0's exit (a loaded machine) was stopped before it had said why.
    """
    if not ranks.distributed:
        return compute()
    result, error = None, None
    if ranks.is_main:
        try:
            result = compute()
        except Exception as e:
            error = e
    message = [None if error is None else "failed", result if error is None else None]
    _collective(ranks, "broadcast_object_list", message, src=0)
    if error is not None:
        try:
            _collective(ranks, "barrier")  # every other rank has said why it stops
        except RankError:  # one died meanwhile: rank 0's own error is still the one to report
            pass
        raise error
    if message[0] is not None:
        stopped = RankError(f"{ranks}: stopped because rank 0 failed (its error line says why)")
        logger.error(f"error: {stopped}")  # the CLI's one line, before rank 0 may leave
        try:
            _collective(ranks, "barrier")
        except RankError:  # rank 0 is gone already: the line is out, nothing more to say
            pass
        raise AlreadyReported(str(stopped))
    return message[1]


def gather(ranks: Ranks, value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank; returns only once all ranks got here."""
    if not ranks.distributed:
        return [value]
    out = [None] * ranks.world_size
    _collective(ranks, "all_gather_object", out, value)
    return out


def barrier(ranks: Ranks) -> None:
    """Wait until every rank got here (nothing for a single process): called when all work is done, so that no
    rank leaves the group while another still works in it (gloo aborted at exit in one rank that had)."""
    if ranks.distributed:
        _collective(ranks, "barrier")


def _collective(ranks: Ranks, name: str, *args, **kwargs) -> None:
    import torch.distributed as dist

    try:
        getattr(dist, name)(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:  # a peer died (connection closed) or never came (timeout)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankError(f"{ranks}: lost contact with the other ranks ({first[:200]}); another rank failed or "
                        "was killed. Complete parts are kept: run the same command again, with any number "
                        "of ranks, to resume") from None
