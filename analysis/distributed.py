"""Several processes, one data set: shards of a question list, torchrun's group, barriers, sums.

A :class:`Shard` (``--shard i/n``, or torchrun's ``RANK`` / ``WORLD_SIZE`` through
:func:`distributed`) takes every n-th question, so the union of the shards is the whole file
whatever n; every job that walks a question file (the dump, the exit sweep, gate training) splits
its work this way. Outside torchrun every helper here is a no-op over one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from analysis.errors import UsageError
from analysis.io import shard_tag

T = TypeVar("T")

__all__ = ["Shard", "all_sum", "barrier", "distributed", "local_device"]


@dataclass(frozen=True)
class Shard:
    """Which part of a question file one process handles: every ``count``-th question from ``index``.

    The split is strided by position in the file, so the union of the shards 0..count-1 is the whole
    file whatever the count, and each shard writes files named with its own ``tag``.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(f"expected a shard i/n with 0 <= i < n, found {self.index}/{self.count}")

    @property
    def tag(self) -> str:
        """The file-name tag of this shard's files (empty for a single process)."""
        return shard_tag(self.index, self.count)

    def select(self, items: Sequence[T]) -> list[T]:
        """This shard's items: positions index, index + count, index + 2 count, ..."""
        return list(items[self.index :: self.count])

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` (0-based i), as given to ``--shard``."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise UsageError(f"expected a shard as i/n (e.g. 0/4), found {text!r}") from None
        return cls(index, count)

    @classmethod
    def from_environment(cls) -> Shard | None:
        """The shard of this process under torchrun (``RANK`` / ``WORLD_SIZE``), or None outside it."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))


@contextmanager
def distributed(backend: str = "gloo") -> Iterator[Shard]:
    """Join torchrun's process group for the block (gloo by default: CPU, and CUDA tensors for the
    small reductions this toolkit does) and yield this process's shard; outside torchrun (no
    ``RANK`` / ``WORLD_SIZE``) yield the single shard 0/1 and start nothing.

    The group is destroyed at the end of the block if this block created it, after a barrier when
    the block ends normally: a process that tears its group down while its peers still talk to it
    can be aborted by gloo ("terminate called without an active exception").
    """
    import torch.distributed as dist

    shard = Shard.from_environment()
    if shard is None or shard.count == 1 or not dist.is_available():
        yield shard or Shard()
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    try:
        yield Shard(dist.get_rank(), dist.get_world_size())
    except BaseException:
        if created and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other processes may never reach one
        raise
    if created and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process of the torch.distributed group; nothing outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_sum(values: Sequence[int | float]) -> list[float]:
    """Element-wise sum of ``values`` over the torch.distributed group (the values themselves outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()




def local_device(device: str) -> str:
    """Under torchrun, ``cuda`` means this process's GPU (``cuda:LOCAL_RANK``); other devices pass through."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device
