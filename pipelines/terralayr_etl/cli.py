"""The ``terralayr-etl`` command line.

Exit status:

- 0: the run loaded every window and every check passed.
- 1: a check failed.
- 2: a user error (bad config, missing credentials, wrong password, unknown resolution, a
  locked warehouse) or a full disk, printed as one line on stderr without a traceback.
- 3: the run finished but left windows or virtual assets out. One line on stderr reports it and
  names the quarantine folder with the details.
- 4: every window loaded and every check passed, but some payloads loaded only on a re-fetch.
- 5: the command stopped on an unexpected error (a bug, a DuckDB or operating-system failure).
  The traceback and one line naming the error and the run are on stderr; the run's row in
  the runs table says failed.
- 130: stopped with Ctrl+C; the last line starts with "aborted".
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated

# Keep Prefect's local server from phoning home: this tool runs on machines without internet.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import typer  # noqa: E402

from terralayr_etl import interrupts  # noqa: E402
from terralayr_etl.errors import TerralayrError, error_chain, one_line  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fetch terralayr revenue data into Parquet and DuckDB, or serve the local sandbox API.",
)

StartOption = Annotated[str | None, typer.Option("--start", help="First local delivery day, YYYY-MM-DD.")]
EndOption = Annotated[str | None, typer.Option("--end", help="Day after the last local delivery day (exclusive), YYYY-MM-DD.")]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Folder for Parquet, the DuckDB file and quarantine. Default: data/.")]
SkipChecksOption = Annotated[
    bool,
    typer.Option("--skip-checks", help="Load without building the SQL models and running the checks; run 'terralayr-etl check' later."),
]
FaultsOption = Annotated[str | None, typer.Option("--faults", help="Sandbox fault injection, e.g. 'all' or '429=0.05,500=0.02'.")]


def _data_dir(value: Path | None) -> Path:
    from terralayr_etl.config import load_settings

    return value or Path(load_settings().pipeline.data_dir)


@app.command()
def demo(
    start: StartOption = "2024-10-20",
    end: EndOption = "2024-11-03",
    data_dir: DataDirOption = None,
    faults: FaultsOption = None,
) -> None:
    """Start the sandbox on a free 127.0.0.1 port and run the whole nightly pipeline against it."""
    from terralayr_etl.demo import run_demo
    from terralayr_etl.timeutil import parse_day

    code = run_demo(
        start=parse_day(start, option="--start"),
        end=parse_day(end, option="--end"),
        data_dir=_data_dir(data_dir),
        faults=faults,
    )
    raise typer.Exit(code)


@app.command()
def sandbox(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 8400,
    seed: Annotated[int | None, typer.Option(help="Seed for the generated data (default from config/sandbox.toml).")] = None,
    latency_ms: Annotated[float, typer.Option("--latency-ms", help="Delay added to every response, in milliseconds.")] = 0.0,
    virtual_assets: Annotated[int | None, typer.Option("--virtual-assets", help="Serve a generated organisation of N virtual assets instead of the demo one.")] = None,
    faults: FaultsOption = None,
    cache_mb: Annotated[float, typer.Option("--cache-mb", min=0, help="Keep up to this many MB of rendered bodies and serve repeated requests from them (0: off).")] = 0.0,
) -> None:
    """Serve the stand-in terralayr API until stopped (Ctrl+C)."""
    from terralayr_etl.sandbox.server import serve_forever

    serve_forever(
        host=host, port=port, seed=seed, latency_ms=latency_ms, virtual_assets=virtual_assets, faults=faults, cache_mb=cache_mb
    )


@app.command()
def run(
    start: StartOption = None,
    end: EndOption = None,
    resolution: Annotated[list[str] | None, typer.Option("--resolution", help="Resolution to fetch (repeat for several): raw, 15min, hourly, daily.")] = None,
    data_dir: DataDirOption = None,
    skip_checks: SkipChecksOption = False,
) -> None:
    """Run the nightly flow against the API named by TERRALAYR_BASE_URL.

    Without --start, each entity and resolution starts at its own watermark minus the
    configured lookback (pipeline.history_start when it has none).
    """
    from terralayr_etl.flows import run_nightly
    from terralayr_etl.timeutil import parse_day

    data_path = _data_dir(data_dir)
    _preflight(start, end, resolution, data_path)
    _freeze_imported_objects()
    try:
        summary = run_nightly(
            start=parse_day(start, option="--start") if start else None,
            end=parse_day(end, option="--end") if end else None,
            resolutions=resolution,
            data_dir=data_path,
            skip_checks=skip_checks,
        )
    except KeyboardInterrupt as exc:
        print_at_exit(_aborted_line(exc))
        raise typer.Exit(_interrupted_status(exc)) from None
    _print_run(summary)
    raise typer.Exit(exit_code(summary))


@app.command()
def backfill(
    start: Annotated[str, typer.Option("--start", help="First local delivery day, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option("--end", help="Day after the last local delivery day (exclusive), YYYY-MM-DD.")],
    resolution: Annotated[list[str] | None, typer.Option("--resolution", help="Resolution to fetch (repeat for several).")] = None,
    data_dir: DataDirOption = None,
    skip_checks: SkipChecksOption = False,
) -> None:
    """Fetch any range of local days, independent of the watermark."""
    run(start=start, end=end, resolution=resolution, data_dir=data_dir, skip_checks=skip_checks)


@app.command()
def check(data_dir: DataDirOption = None) -> None:
    """Rebuild the SQL models and re-run the checks; exit 1 when any check fails."""
    from terralayr_etl.config import load_settings
    from terralayr_etl.models import run_checks, run_models
    from terralayr_etl.warehouse import Warehouse

    path = _data_dir(data_dir) / "warehouse.duckdb"
    if not path.exists():
        raise TerralayrError(f"warehouse {path} not found; run 'terralayr-etl run' or 'terralayr-etl demo' first")
    chunk_rows = load_settings().pipeline.check_chunk_rows
    with Warehouse(path) as warehouse:
        run_models(warehouse.connection, chunk_rows=chunk_rows)
        summary = run_checks(warehouse.connection)
    print_checks(summary.by_check, summary.passed, summary.failed)
    raise typer.Exit(0 if summary.failed == 0 else 1)


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="Cron schedule in Europe/Berlin time.")] = "30 3 * * *",
) -> None:
    """Serve the nightly flow as a Prefect deployment on a cron schedule (Europe/Berlin)."""
    from prefect.schedules import Cron

    from terralayr_etl.allocators import limit_child_arenas
    from terralayr_etl.flows import nightly

    limit_child_arenas()
    nightly.serve(name="nightly", schedules=[Cron(cron, timezone="Europe/Berlin")])


def _freeze_imported_objects() -> None:
    """Keep the garbage collector from walking the objects of the imports again.

    The imports (Prefect and pydantic above all) leave about 150,000 objects that live as
    long as the process. Each full collection walked all of them: four took 0.22 s in W1's
    backfill, with every thread stopped. Frozen, they are never collected, which a process
    that runs one flow and exits can afford.
    """
    import gc

    gc.collect()
    gc.freeze()


def _preflight(start: str | None, end: str | None, resolutions: list[str] | None, data_dir: Path) -> None:
    """Check settings, dates, resolutions, credentials, one authentication and the warehouse
    lock before the flow starts, so a user error ends in one line instead of a failed flow run."""
    # Progress lines from the checks below would turn a one-line error into several.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        _check_before_run(start, end, resolutions, data_dir)
    finally:
        root.setLevel(level)


def _check_before_run(start: str | None, end: str | None, resolutions: list[str] | None, data_dir: Path) -> None:
    from terralayr_etl.client import ApiClient
    from terralayr_etl.config import load_credentials, load_settings
    from terralayr_etl.pipeline import check_resolutions, resolve_span
    from terralayr_etl.timeutil import local_midnight
    from terralayr_etl.warehouse import Warehouse

    settings = load_settings()
    check_resolutions(resolutions or settings.pipeline.resolutions, settings)
    span = resolve_span(start, end, settings)
    credentials = load_credentials()
    with ApiClient(settings, credentials) as client:
        last_day = span.end_day - timedelta(days=1)
        client.verify_access(local_midnight(last_day), local_midnight(span.end_day))
    # Opening the warehouse takes its lock for a moment, which fails at once while another
    # process holds it. A process that takes it after this check still gets the same error.
    with Warehouse(data_dir / "warehouse.duckdb"):
        pass


def exit_code(summary: dict) -> int:
    """Return the exit status for a finished run, printing the one-line error of a failed one."""
    from terralayr_etl.run_report import exit_status, failure_line

    if summary["status"] == "failed":
        print_at_exit(f"error: {failure_line(summary)}")
    return exit_status(summary)


def print_checks(by_check: dict, passed: int, failed: int) -> None:
    """Print the check totals and one line per check with its passed and failed comparisons."""
    typer.echo(f"Checks: {passed:,} passed, {failed:,} failed")
    for name, counts in sorted(by_check.items()):
        typer.echo(f"  {name:<44} pass {counts.get('pass', 0):>9,}  fail {counts.get('fail', 0):>7,}")


def _print_run(summary: dict) -> None:
    typer.echo(
        f"Run {summary['run_id']} ({summary['status']}): local days {summary['start']} to {summary['end']} (end exclusive), "
        f"{summary['windows']:,} windows, {summary['requests']:,} requests, {summary['retries']:,} retries, "
        f"{summary['rows_loaded']:,} rows loaded (data points and revenue buckets)"
    )
    from terralayr_etl.run_report import describe_recovered_problems

    for line in describe_recovered_problems(summary.get("report") or {}):
        typer.echo(line)
    checks = summary["checks"]
    if checks.get("skipped"):
        typer.echo("Checks: skipped (--skip-checks); run 'terralayr-etl check' to build the models and run them")
        return
    print_checks(checks["by_check"], checks["passed"], checks["failed"])


_CLOSING_LINES: list[str] = []


def print_at_exit(line: str) -> None:
    """Queue ``line`` for stderr as the process's last line, after Prefect's shutdown log lines.

    Prefect stops its temporary server in an exit handler, which logs after the command has
    returned. Exit handlers run in reverse order of registration, and ``main`` registers the
    one that prints these lines before Prefect is imported, so it runs last.
    """
    _CLOSING_LINES.append(line)


def _print_closing_lines() -> None:
    # Python flushes a buffered stdout (a file or a pipe) only after the exit handlers, so
    # without this flush the summary would come after the error line in 'demo > log 2>&1'.
    sys.stdout.flush()
    for line in _CLOSING_LINES:
        typer.echo(line, err=True)


def main() -> None:
    """Entry point: run the CLI, turning project errors into one line and exit status 2."""
    import atexit

    atexit.register(_print_closing_lines)
    # SIGTERM's default action (systemctl stop, docker stop) skips the exit handlers, which
    # print the closing line and stop Prefect's temporary server.
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, _raise_interrupted)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP request drowns the progress lines; retries and errors are logged by the client.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        # Without standalone mode, click returns the code of a raised typer.Exit instead of exiting.
        code = app(standalone_mode=False)
    except TerralayrError as exc:
        print_at_exit(" ".join([f"error: {exc}", *_run_notes(exc)]))
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt) as exc:
        head = "stopped on SIGTERM" if isinstance(exc, Terminated) else "aborted"
        print_at_exit(" ".join([head, *_run_notes(exc)]))
        sys.exit(_interrupted_status(exc))
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):  # usage errors
            exc.show()
            sys.exit(exc.exit_code)
        sys.exit(_report_crash(exc))
    if code == INTERRUPTED_EXIT_STATUS and not _CLOSING_LINES:
        # typer turns Ctrl+C into this exit status itself.
        print_at_exit("aborted")
    sys.exit(code if isinstance(code, int) else 0)


CRASH_EXIT_STATUS = 5
INTERRUPTED_EXIT_STATUS = 130
TERMINATED_EXIT_STATUS = 143
"""128 + SIGTERM, as a shell reports a process that SIGTERM ended."""


class Terminated(KeyboardInterrupt):
    """Exception raised in the main thread on SIGTERM, which stops a run as Ctrl+C does."""


def _raise_terminated(signum: int, frame: object) -> None:
    # During a flow run Prefect's own handler turns SIGTERM into its TerminationSignal, lets
    # the flow record its end, then sends SIGTERM again, which reaches this handler.
    interrupts.record(signum)
    raise Terminated()


def _raise_interrupted(signum: int, frame: object) -> None:
    interrupts.record(signum)
    signal.default_int_handler(signum, frame)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """Return the interrupt that ``exc`` came from, or one for a signal that arrived meanwhile.

    DuckDB turns an interrupt during a query into its own error (see ``interrupts``), so the
    signal may show only in the record.
    """
    interrupt = _cause_of_type(exc, KeyboardInterrupt)
    last = interrupts.last()
    if interrupt is not None or last is None:
        return interrupt
    interrupt = Terminated() if last == signal.SIGTERM else KeyboardInterrupt()
    # The run's notes are on ``exc``, where _run_notes finds them through the context.
    interrupt.__context__ = exc
    return interrupt


def _interrupted_status(interrupt: BaseException) -> int:
    return TERMINATED_EXIT_STATUS if isinstance(interrupt, Terminated) else INTERRUPTED_EXIT_STATUS


def _run_notes(exc: BaseException) -> list[str]:
    """Return the notes in which the flow names the run that ``exc`` stopped, as sentences."""
    flows = sys.modules.get("terralayr_etl.flows")  # not imported: no run started
    if flows is None:
        return []
    prefix = flows.RUN_NOTE_PREFIX
    # After SIGTERM the note is on Prefect's TerminationSignal, from which Terminated came.
    for error in error_chain(exc):
        notes = [f"Run {note.removeprefix(prefix)}." for note in getattr(error, "__notes__", []) if note.startswith(prefix)]
        if notes:
            return notes
    return []


def _aborted_line(interrupt: BaseException) -> str:
    if isinstance(interrupt, Terminated):
        head = "stopped: the run received SIGTERM."
    else:
        head = "aborted: the run stopped on Ctrl+C."
    return " ".join(
        [
            head,
            *_run_notes(interrupt),
            "What it committed stays loaded; run the same command again to complete it (a re-run adds "
            "no duplicates).",
        ]
    )


def _report_crash(exc: Exception) -> int:
    """Print the traceback of an unexpected error and one line with the error and the next step.

    A full disk is no bug, so it gets one line without a traceback and exit status 2. An error
    that came from Ctrl+C (Prefect's temporary server stops on it too, so Prefect's calls then
    fail) or arrived after it (DuckDB's interrupted query) gets the line of an interrupted run
    and exit status 130, or 143 after SIGTERM.
    """
    import traceback

    interrupt = _interrupt_behind(exc)
    if interrupt is not None:
        print_at_exit(_aborted_line(interrupt))
        return _interrupted_status(interrupt)
    run_notes = _run_notes(exc)
    logged = _logged_by_flow(exc)
    line, status = crash_line(exc, run_notes, logged=logged)
    if status == CRASH_EXIT_STATUS and not logged:
        traceback.print_exception(exc)
    print_at_exit(line)
    return status


def _logged_by_flow(exc: BaseException) -> bool:
    flows = sys.modules.get("terralayr_etl.flows")  # not imported: no flow ran
    return flows is not None and flows.logged_by_flow(exc)


def crash_line(exc: BaseException, run_notes: list[str], *, logged: bool = False) -> tuple[str, int]:
    """Return the closing line for an error no other handler took, and the exit status.

    ``logged`` is True when the flow run's log already contains the traceback.
    """
    committed = ["What the run committed before the error stays loaded, and a re-run adds no duplicates."] if run_notes else []
    full_disk = _full_disk_error(exc)
    if full_disk is not None:
        head = f"error: no space left on the device: {one_line(full_disk)}."
        return " ".join([head, *run_notes, *committed, "Free disk space there and run the same command again."]), 2
    head = f"error: terralayr-etl stopped on an unexpected {type(exc).__name__}: {one_line(exc)}."
    where = "the traceback in the flow run's log above" if logged else "the traceback above"
    advice = f"Fix the cause and run the same command again, or report {where} if the error persists."
    return " ".join([head, *run_notes, *committed, advice]), CRASH_EXIT_STATUS


def _cause_of_type(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """Return ``exc`` or the first error it came from that is a ``kind``, or None."""
    return next((error for error in error_chain(exc) if isinstance(error, kind)), None)


def _full_disk_error(exc: BaseException) -> BaseException | None:
    """Return ``exc`` or the error it came from that reports a full disk (ENOSPC), or None."""
    import errno

    duckdb = sys.modules.get("duckdb")
    for error in error_chain(exc):
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        # DuckDB reports the operating system's message in its own IOException.
        if duckdb is not None and isinstance(error, duckdb.Error) and os.strerror(errno.ENOSPC) in str(error):
            return error
    return None
