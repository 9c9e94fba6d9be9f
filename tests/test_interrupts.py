"""The record of stop signals that the CLI reads when DuckDB has swallowed an interrupt, and the
flow's search for a signal behind an error."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from prefect.exceptions import TerminationSignal

from terralayr_etl import flows, interrupts


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


def _raised_while_handling(first: BaseException, second: BaseException) -> BaseException:
    """Return ``second`` as raised while ``first`` was handled, with ``first`` as its context."""
    try:
        try:
            raise first
        except BaseException:
            raise second  # noqa: B904, the implicit context is the point
    except BaseException as exc:
        return exc


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (KeyboardInterrupt(), KeyboardInterrupt),
        (TerminationSignal(signal.SIGTERM), TerminationSignal),
        # asyncio's cancellation is no signal: an error from a timeout in Prefect's client.
        (asyncio.CancelledError(), None),
    ],
)
def test_flow_finds_signal_behind_error(first: BaseException, expected: type[BaseException] | None):
    error = _raised_while_handling(first, ValueError("Task run is not set"))

    found = flows._signal_behind(error)

    assert (type(found) if found is not None else None) is expected
