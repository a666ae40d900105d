"""Ranks of a run: one process, or several launched by torchrun (torch.distributed).

A run with N ranks makes one streaming pass: every rank reads each block itself (memory-mapped safetensors: on one
node the page cache serves the other ranks' reads), runs the block forward on its share of the calibration windows
and adds its share of the statistics; the statistics are summed across ranks (`all_reduce_sum`), each linear is
solved by one rank (`owner`) and its stored tensors broadcast from there (`broadcast`); rank 0 alone writes the
output, the journal and the report (`is_writer`). With one process every collective is a no-op.

Errors: a rank that raises claims the job's one error message in the rendezvous store (`claim_report`), so it is
printed once; a rank whose peer vanished (killed, or exited on its own error) gets `RankLost` from the next
collective and stays quiet when the peer's message was claimed.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from streamprune.errors import ArgumentError, StreamPruneError

logger = logging.getLogger(__name__)

ERROR_KEY = "streamprune/error"
# How long a rank waits in a collective for the others: longer than the slowest solve of one linear.
DEFAULT_TIMEOUT_MINUTES = 30.0
TIMEOUT_ENV = "STREAMPRUNE_DIST_TIMEOUT_MINUTES"


class RankLost(StreamPruneError):
    """A collective failed: another rank died or exited on its own error."""


@dataclass
class Shares:
    windows: Tensor | None  # this rank's calibration windows
    eval_windows: Tensor | None  # and --eval windows
    nsamples: int  # how many calibration windows it holds (the memory plan's count)


@dataclass
class Ranks:
    """The processes of one run. `Ranks()` is the single process, whose collectives return at once."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes the output, the journal and the report (rank 0)."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """The ranks torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR...), the
        process group joined (NCCL when CUDA is present, else gloo); a single process without them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_available():
            raise ArgumentError(f"WORLD_SIZE={world!r} but this torch build has no torch.distributed")
        ranks = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if not dist.is_initialized():
            minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MINUTES))
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            kwargs: dict[str, Any] = {}
            if backend == "nccl":
                torch.cuda.set_device(ranks.local_rank)
                kwargs["device_id"] = torch.device("cuda", ranks.local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes), **kwargs)
        return ranks

    def device(self, device: torch.device) -> torch.device:
        """This rank's compute device: cuda:LOCAL_RANK for a CUDA run with several ranks."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items (windows): the first n % world ranks take one more."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (1 if self.rank < extra else 0))

    def shares(self, nsamples: int, windows: Tensor | None, eval_windows: Tensor | None,
               moe_dense_statistics: bool = False) -> Shares:
        """This rank's share of the calibration and --eval windows; refuses fewer windows than ranks, and an MoE
        model without --sequential (`moe_dense_statistics`: its pruned forward reads the experts back from the shard
        rank 0 is writing)."""
        if not self.distributed:
            return Shares(windows, eval_windows, nsamples)
        if moe_dense_statistics:
            raise ArgumentError(f"--no-sequential on a Mixture-of-Experts model runs in one process, not {self.world} "
                                "ranks; drop --no-sequential or launch one process")
        for what, n in (("calibration", nsamples if windows is None else windows.shape[0]),
                        ("--eval", None if eval_windows is None else eval_windows.shape[0])):
            if n is not None and n < self.world:
                raise ArgumentError(f"{n!r} {what} windows cannot be shared by {self.world} ranks; use at least "
                                    f"{self.world} or fewer ranks")
        n = nsamples if windows is None else windows.shape[0]
        share = self.share(n)
        return Shares(None if windows is None else windows[share], None if eval_windows is None
                      else eval_windows[self.share(eval_windows.shape[0])], share.stop - share.start)

    def owners(self, sizes: Sequence[int], turn: int = 0) -> list[int]:
        """The rank that solves each of these linears (by element count): largest first, each to the least loaded
        rank, ties to the first from rank `turn` on (so that single-linear sites rotate), the same on every rank."""
        load = [0] * self.world
        owner = [0] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], (r - turn) % self.world))
            owner[i] = r
            load[r] += sizes[i]
        return owner

    # collectives: no-ops with one process
    def _collective(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except RuntimeError as e:  # DistBackendError, gloo's "Connection closed by peer", timeouts
            raise RankLost(f"rank {self.rank} lost contact with the other ranks ({first_line(e)}); rerun the same "
                           "command to resume") from e

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum `t` over the ranks, in place."""
        if self.distributed:
            import torch.distributed as dist

            self._collective(dist.all_reduce, t)
        return t

    def sum_int(self, n: int) -> int:
        if not self.distributed:
            return n
        return int(self.all_reduce_sum(torch.tensor([n], dtype=torch.int64, device=self.comm_device)).item())

    def sum_float(self, x: float) -> float:
        if not self.distributed:
            return x
        return float(self.all_reduce_sum(torch.tensor([x], dtype=torch.float64, device=self.comm_device)).item())

    def broadcast(self, t: Tensor, src: int) -> Tensor:
        """`t` as rank `src` holds it, on every rank, in place; sent as bytes, whatever its dtype."""
        if self.distributed:
            import torch.distributed as dist

            on = t if t.device == self.comm_device and t.is_contiguous() else t.to(self.comm_device).contiguous()
            self._collective(dist.broadcast, on.view(-1).view(torch.uint8), src)
            if on is not t and self.rank != src:
                t.copy_(on)
        return t

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        self._collective(dist.all_gather_object, out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._collective(dist.barrier)

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for the backend: the rank's GPU with NCCL, else the CPU."""
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def claim_report(self, message: str, lost: bool = False) -> bool:
        """Whether this rank prints the job's error `message`: the first rank to raise does; a rank that lost its
        peers (`lost`) reports only on rank 0 and only when no rank claimed an error before."""
        if not self.distributed:
            return True
        if lost and self.rank != 0:
            return False
        try:
            import torch.distributed as dist

            store = dist.distributed_c10d._get_default_store()
            mine = pickle.dumps((self.rank, message))
            return bytes(store.compare_set(ERROR_KEY, "", mine)) == mine
        except Exception:  # noqa: BLE001 - the store went with the job: say it here
            return self.rank == 0

    def stop_on_sigterm(self) -> None:
        """With several ranks, SIGTERM (torchrun stopping the job because another rank ended) raises `RankLost`, so
        that rank 0 says why when no rank has said it yet."""
        if not self.distributed:
            return

        def stop(signum: int, frame: Any) -> None:
            raise RankLost("stopped by SIGTERM: another rank ended (torchrun's summary names it); rerun the same "
                           "command to resume")

        signal.signal(signal.SIGTERM, stop)

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
