"""allocators.py: the malloc arena limit and Arrow's default pool, set at package import.

Each test runs a fresh interpreter, because both settings only take effect before the first
import of pyarrow and before other threads allocate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_ARENA_COUNT = textwrap.dedent(
    """
    import ctypes, ctypes.util, os, tempfile, threading
    import terralayr_etl
    import pyarrow, polars, duckdb

    def churn():
        for _ in range(2000):
            blocks = [bytearray(4096) for _ in range(50)]
            del blocks

    threads = [threading.Thread(target=churn) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fopen.restype = ctypes.c_void_p
    path = tempfile.mktemp()
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(open(path).read().count("<heap nr="))
    os.remove(path)
    """
)


def _run(code: str, **environment: str) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("ARROW_DEFAULT_MEMORY_POOL", "MALLOC_ARENA_MAX")}
    env.update(environment)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return completed.stdout.strip()


def test_arrow_pool_is_system_allocator() -> None:
    backend = _run("import terralayr_etl, pyarrow; print(pyarrow.default_memory_pool().backend_name)")

    assert backend == "system"


def test_arrow_pool_follows_environment() -> None:
    backend = _run(
        "import terralayr_etl, pyarrow; print(pyarrow.default_memory_pool().backend_name)",
        ARROW_DEFAULT_MEMORY_POOL="mimalloc",
    )

    assert backend == "mimalloc"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc arenas are glibc's")
def test_malloc_arenas_stay_at_limit() -> None:
    from terralayr_etl.allocators import MALLOC_ARENAS

    arenas = int(_run(_ARENA_COUNT))

    assert 1 <= arenas <= MALLOC_ARENAS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc arenas are glibc's")
def test_child_process_gets_arena_limit() -> None:
    # A flow run of 'terralayr-etl serve' runs in a child process that starts Prefect's threads
    # before it imports this package, too late for the package's own call to set the limit.
    from terralayr_etl.allocators import MALLOC_ARENAS

    child = _ARENA_COUNT.replace("import terralayr_etl\n", "")
    assert "terralayr_etl" not in child
    parent = (
        "import subprocess, sys\nfrom terralayr_etl.allocators import limit_child_arenas\n"
        f"limit_child_arenas()\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)"
    )

    arenas = int(_run(parent))

    assert 1 <= arenas <= MALLOC_ARENAS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc arenas are glibc's")
def test_environment_arena_limit_wins() -> None:
    from terralayr_etl.allocators import MALLOC_ARENAS

    arenas = int(_run(_ARENA_COUNT, MALLOC_ARENA_MAX="6"))

    assert MALLOC_ARENAS < arenas <= 6
