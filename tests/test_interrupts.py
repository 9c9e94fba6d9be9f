"""The record of stop signals that the CLI reads when DuckDB has swallowed an interrupt."""

from __future__ import annotations

import os
import signal
import time

import pytest

from terralayr_etl import interrupts


class _Stop(Exception):
    """Raised by the stand-in for Prefect's SIGTERM handler."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop()


def test_noting_sigterm_records_then_calls_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interrupts, "RECEIVED", [])
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with pytest.raises(_Stop):
            with interrupts.noting_sigterm():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the signal ends the sleep at once
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert interrupts.RECEIVED == [signal.SIGTERM]
    assert interrupts.last() == signal.SIGTERM
    assert restored is _stop


def test_noting_sigterm_leaves_default_action(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interrupts, "RECEIVED", [])
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with interrupts.noting_sigterm():
            inside = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert inside == signal.SIG_DFL
    assert interrupts.last() is None
