"""Allocator settings that only take effect before other libraries start threads or allocate.

The package's ``__init__`` calls ``configure_allocators`` before anything imports pyarrow,
polars, DuckDB or Prefect, because two of glibc's and Arrow's choices are fixed early:

- glibc fixes its limit on malloc arenas when a second thread first needs one. Set later, as
  when ``resources.py`` set it after the imports, the backfill of the W1 benchmark still ran
  with six arenas instead of two.
- Arrow's C++ code, such as the Parquet writer, allocates from the pool that Arrow picks when
  pyarrow is first imported. In the PyPI wheels that is mimalloc. Its 1 GB arena kept up to
  56 MB of freed memory during that backfill.

With both settings the W1 backfill peaked at about 350 MB instead of 418 MB, at the same CPU
time (see docs/benchmarks.md). An import of pyarrow before this package keeps Arrow's choice,
and ``ARROW_DEFAULT_MEMORY_POOL`` set in the environment wins over this default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

MALLOC_ARENAS = 2
"""At most this many glibc malloc arenas, the main one included."""

ARENA_VARIABLE = "MALLOC_ARENA_MAX"
"""The environment variable from which glibc reads its arena limit at process start."""

_M_ARENA_MAX = -8
"""glibc's mallopt parameter number for the arena limit (malloc.h)."""


def configure_allocators() -> None:
    """Limit glibc's malloc arenas and make Arrow's default pool the system allocator.

    A ``MALLOC_ARENA_MAX`` in the environment wins: glibc applied it when the process started.
    """
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    if ARENA_VARIABLE in os.environ:
        return
    library = ctypes.util.find_library("c")
    if library is None:
        return
    try:
        mallopt = ctypes.CDLL(library).mallopt
    except (OSError, AttributeError):
        # Not glibc (musl, macOS): those allocators have no arena limit to set.
        logger.debug("No mallopt in %s; the malloc arena limit is not set", library)
        return
    mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


def limit_child_arenas() -> None:
    """Pass the arena limit on to the processes this one starts, unless the environment sets one.

    Prefect's runner starts each flow run of ``terralayr-etl serve`` in a child process that
    starts Prefect's threads before it imports this package, too late for ``mallopt``. glibc
    reads the variable before the child's first allocation.
    """
    os.environ.setdefault(ARENA_VARIABLE, str(MALLOC_ARENAS))
