"""Process-wide limits that keep the pipeline's memory flat while many windows are in flight.

The fetch threads (``api.max_concurrency`` plus ``pipeline.windows_waiting_for_cpu``, 12 by
default) exist to overlap network waits. Decoding, normalising and writing a window is CPU
work that uses tens of MB while it runs, and more of those running at once than there are
CPUs adds memory without adding speed, so ``CPU_SLOTS`` bounds them.

Importing this module also makes the system allocator pyarrow's pool for buffers that Python
code creates, because with eight threads the per-thread caches of the allocators kept about
200 MB that the pipeline no longer used (measured by replaying the 726 responses of the W1
benchmark, see docs/benchmarks.md). ``allocators.py`` sets the rest at package import.
"""

from __future__ import annotations

import logging
import os
import threading

import pyarrow as pa

logger = logging.getLogger(__name__)

class ReentrantSlots:
    """A counting semaphore that the thread holding a slot can enter again without blocking.

    Use it as a context manager. A thread takes one slot at its outermost ``with`` and gives it
    back when that block ends.
    """

    def __init__(self, count: int):
        self._semaphore = threading.BoundedSemaphore(count)
        self._local = threading.local()

    def acquire(self) -> None:
        """Take a slot, waiting for one unless this thread already has one."""
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._semaphore.acquire()
        self._local.depth = depth + 1

    def release(self) -> None:
        """Undo one ``acquire``; the slot goes back with the thread's last release."""
        self._local.depth -= 1
        if self._local.depth == 0:
            self._semaphore.release()

    def __enter__(self) -> ReentrantSlots:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


CPU_SLOTS = ReentrantSlots(max(2, os.cpu_count() or 2))
"""Held from the moment a window's responses are in until its rows are written to Parquet,
so that threads waiting for a slot hold only response bodies, not normalised tables."""


def _use_system_allocator() -> None:
    pa.set_memory_pool(pa.system_memory_pool())


_use_system_allocator()
