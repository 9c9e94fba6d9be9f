"""The signals that asked this process to stop, in the order they arrived.

DuckDB turns a KeyboardInterrupt raised during a query into its own RuntimeError('Query
interrupted'), and the statements after it into TransactionException. During a flow run,
Prefect's SIGTERM handler raises a TerminationSignal, which DuckDB swallows the same way. So
the error that ends a run may not show the signal, and the CLI looks here instead.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

RECEIVED: list[int] = []


def record(signum: int) -> None:
    """Add ``signum`` to the signals received."""
    RECEIVED.append(signum)


def last() -> int | None:
    """Return the last signal received, or None."""
    return RECEIVED[-1] if RECEIVED else None


@contextmanager
def noting_sigterm() -> Iterator[None]:
    """Record SIGTERM before the handler installed now runs (Prefect's, inside a flow run).

    Signal handlers can change only in the main thread. In another thread, or when no Python
    handler is installed, this does nothing.
    """
    installed = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(installed):
        yield
        return

    def record_then_call(signum: int, frame: FrameType | None) -> None:
        record(signum)
        installed(signum, frame)

    signal.signal(signal.SIGTERM, record_then_call)
    try:
        yield
    finally:
        # Put the earlier handler back only if no other one replaced this one meanwhile.
        if signal.getsignal(signal.SIGTERM) is record_then_call:
            signal.signal(signal.SIGTERM, installed)
