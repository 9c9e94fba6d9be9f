"""The CLI's closing line for errors that no other handler takes: a full disk and a crash."""

from __future__ import annotations

import errno
import signal

import duckdb
import pytest

from terralayr_etl import cli, flows, interrupts
from terralayr_etl.cli import CRASH_EXIT_STATUS, crash_line

RUN_NOTE = "Run 0f0e-test is marked failed in the runs table of /data/warehouse.duckdb."


def _duckdb_full_disk_error() -> duckdb.Error:
    # /dev/full fails every write with ENOSPC, so DuckDB raises the error of a full disk.
    connection = duckdb.connect()
    try:
        connection.execute("copy (select range from range(1000)) to '/dev/full' (format csv)")
    except duckdb.Error as exc:
        return exc
    finally:
        connection.close()
    raise AssertionError("writing to /dev/full did not fail")


def test_duckdb_full_disk_exit_2():
    error = _duckdb_full_disk_error()

    line, status = crash_line(error, [RUN_NOTE])

    assert status == 2
    assert line.startswith("error: no space left on the device: IO Error:")
    assert "/dev/full" in line
    assert RUN_NOTE in line
    assert "Free disk space there and run the same command again" in line
    assert "\n" not in line


def test_full_disk_behind_other_error():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/parquet/x.parquet")
        except OSError as cause:
            raise RuntimeError("writing the run's report failed") from cause
    except RuntimeError as exc:
        line, status = crash_line(exc, [])

    assert status == 2
    assert "no space left on the device" in line


@pytest.mark.parametrize(
    ("notes", "logged", "where"),
    [
        ([], False, "the traceback above"),
        ([], True, "the flow run's log above"),
        ([RUN_NOTE], True, "the flow run's log above"),
    ],
)
def test_other_error_is_crash_exit_5(notes: list[str], logged: bool, where: str):
    connection = duckdb.connect()
    try:
        with pytest.raises(duckdb.BinderException) as raised:
            connection.execute("select no_such_column from range(1)")
    finally:
        connection.close()

    line, status = crash_line(raised.value, notes, logged=logged)

    assert status == CRASH_EXIT_STATUS
    assert line.startswith("error: terralayr-etl stopped on an unexpected BinderException: Binder Error:")
    assert "no_such_column" in line
    assert where in line
    assert all(note in line for note in notes)
    assert "\n" not in line


def test_error_after_ctrl_c_is_interrupt_exit_130(monkeypatch: pytest.MonkeyPatch):
    # Ctrl+C also stops Prefect's temporary server, so the run can end on a connection error
    # raised while the KeyboardInterrupt was handled.
    monkeypatch.setattr(cli, "_CLOSING_LINES", [])
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused") from None
    except ConnectionRefusedError as exc:
        # 'from None' hides the context in tracebacks but keeps it in __context__.
        status = cli._report_crash(exc)

    assert status == 130
    assert cli._CLOSING_LINES[-1].startswith("aborted: the run stopped on Ctrl+C.")
    assert "run the same command again" in cli._CLOSING_LINES[-1]


def test_sigterm_line_and_exit_143(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cli, "_CLOSING_LINES", [])
    try:
        raise RuntimeError("the run stopped") from cli.Terminated()
    except RuntimeError as exc:
        status = cli._report_crash(exc)

    assert status == 143
    assert cli._CLOSING_LINES[-1].startswith("stopped: the run received SIGTERM.")


@pytest.mark.parametrize(
    ("handler", "signum", "status", "head"),
    [
        ("_raise_interrupted", signal.SIGINT, 130, "aborted: the run stopped on Ctrl+C."),
        ("_raise_terminated", signal.SIGTERM, 143, "stopped: the run received SIGTERM."),
    ],
)
def test_error_after_signal_is_interrupt(monkeypatch: pytest.MonkeyPatch, handler: str, signum: int, status: int, head: str):
    # DuckDB turns the KeyboardInterrupt raised during a query into RuntimeError('Query
    # interrupted'), which keeps no link to the interrupt.
    monkeypatch.setattr(cli, "_CLOSING_LINES", [])
    monkeypatch.setattr(interrupts, "RECEIVED", [])
    with pytest.raises(KeyboardInterrupt):
        getattr(cli, handler)(signum, None)
    error = RuntimeError("Query interrupted")
    error.add_note(f"{flows.RUN_NOTE_PREFIX}1234 is marked failed in the runs table of w.duckdb")

    returned = cli._report_crash(error)

    assert returned == status
    assert cli._CLOSING_LINES[-1].startswith(f"{head} Run 1234 is marked failed")


def test_error_without_signal_is_crash(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr(cli, "_CLOSING_LINES", [])
    monkeypatch.setattr(interrupts, "RECEIVED", [])
    try:
        raise RuntimeError("Query interrupted")
    except RuntimeError as exc:
        returned = cli._report_crash(exc)

    assert returned == CRASH_EXIT_STATUS
    assert cli._CLOSING_LINES[-1].startswith("error: terralayr-etl stopped on an unexpected RuntimeError")
    assert "Traceback" in capsys.readouterr().err
