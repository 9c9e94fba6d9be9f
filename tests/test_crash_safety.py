"""A run killed with SIGKILL and run again ends with the content of an uninterrupted run.

Each scenario starts ``terralayr-etl run`` as a subprocess and kills its process group with
SIGKILL when the run reaches a given step, seen in its log or on disk. The test checks what
the kill left behind and runs the same command again. Then it compares the warehouse and the
Parquet dataset with those of an uninterrupted run by content (``robust_support.warehouse_digest``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import httpx
import pyarrow.parquet as pq
import pytest
from robust_support import (
    SmallOrg,
    cli_env,
    harness_api_url,
    parquet_digest,
    run_cli,
    serve_small_org,
    wait_for,
    warehouse_digest,
    write_small_org,
)

pytestmark = pytest.mark.slow

ARGS = ["run", "--start", "2024-10-26", "--end", "2024-10-28"]


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> SmallOrg:
    # Two requests in flight and 60 ms of latency spread the fetch over about a second.
    return write_small_org(tmp_path_factory.mktemp("crash-config"), api={"max_concurrency": 2})


@pytest.fixture(scope="module")
def served(org: SmallOrg, prefect_harness):
    with serve_small_org(org, latency_ms=60) as (server, _):
        yield cli_env(org, server.base_url, PREFECT_API_URL=harness_api_url())


@pytest.fixture(scope="module")
def uninterrupted(served: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    data_dir = tmp_path_factory.mktemp("uninterrupted")
    done = run_cli([*ARGS, "--data-dir", str(data_dir)], served)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"warehouse": warehouse_digest(data_dir / "warehouse.duckdb"), "parquet": parquet_digest(data_dir)}


def _log_has(text: str) -> Callable[[Path, Path], bool]:
    return lambda log, data_dir: text in log.read_text()


def _parquet_written(log: Path, data_dir: Path) -> bool:
    return any((data_dir / "parquet").rglob("*.parquet"))


SCENARIOS: dict[str, Callable[[Path, Path], bool]] = {
    "after the run is recorded": _log_has("Planned"),
    "during the fetch": _parquet_written,
    "after the load": _log_has("Loaded "),
    "after the checks": _log_has("Built "),
}
"""When to kill: each step comes after the run's ``running`` row is written."""


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_killed_run_rerun_matches_uninterrupted(scenario: str, served: dict, uninterrupted: dict, tmp_path) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "killed.stderr"
    reached = SCENARIOS[scenario]
    process = _start_run(data_dir, log, served)
    try:
        wait_for(lambda: reached(log, data_dir) or process.poll() is not None, 120, f"the run to reach '{scenario}'")
        assert process.poll() is None, f"the run ended before it could be killed {scenario}"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    for path in (data_dir / "parquet").rglob("*.parquet"):
        assert pq.read_table(path).num_rows > 0, path
    assert _run_statuses(data_dir) == ["running"]
    committed_rows = _stored_rows(data_dir)

    done = run_cli([*ARGS, "--data-dir", str(data_dir)], served)
    assert done.returncode == 0, done.stderr[-3000:]
    assert warehouse_digest(data_dir / "warehouse.duckdb") == uninterrupted["warehouse"]
    assert parquet_digest(data_dir) == uninterrupted["parquet"]
    assert _run_statuses(data_dir) == ["killed", "success"]
    assert _run_rows(data_dir)[0] == committed_rows


def _start_run(data_dir: Path, log: Path, env: dict) -> subprocess.Popen[bytes]:
    """Start ``terralayr-etl run`` in a process group of its own, its stderr going to ``log``."""
    executable = str(Path(sys.executable).with_name("terralayr-etl"))
    with log.open("w") as stderr:
        return subprocess.Popen(
            [executable, *ARGS, "--data-dir", str(data_dir)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )


def _interrupt_during_fetch(data_dir: Path, log: Path, env: dict, *, sigterm: bool = False) -> int | None:
    """Start a run, stop it once it has written Parquet, and return its exit status.

    The run's process group gets SIGINT, as Ctrl+C sends it, or with ``sigterm`` the run's
    process alone gets SIGTERM, as docker stop sends it. A run that does not exit within 60 s
    is killed."""
    process = _start_run(data_dir, log, env)
    try:
        wait_for(lambda: _parquet_written(log, data_dir) or process.poll() is not None, 120, "the fetch to start")
        assert process.poll() is None, "the run ended before it could be interrupted"
        if sigterm:
            os.kill(process.pid, signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    return process.returncode


def _env_with_temporary_server(served: dict, tmp_path: Path) -> dict:
    """Return ``served`` without PREFECT_API_URL, so that the run starts Prefect's temporary server."""
    env = {name: value for name, value in served.items() if name != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def _query(data_dir: Path, sql: str) -> list[tuple]:
    # A read-write connection replays the write-ahead log the killed process left.
    connection = duckdb.connect(str(data_dir / "warehouse.duckdb"))
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def _run_statuses(data_dir: Path) -> list[str]:
    return [row[0] for row in _query(data_dir, "select status from runs order by started_at")]


def _run_rows(data_dir: Path) -> list[int]:
    return [row[0] for row in _query(data_dir, "select rows from runs order by started_at")]


def _stored_rows(data_dir: Path) -> int:
    return _query(data_dir, "select (select count(*) from datapoints) + (select count(*) from revenue_buckets)")[0][0]


def test_ctrl_c_run_exit_130_rerun_matches(served: dict, uninterrupted: dict, tmp_path) -> None:
    """Ctrl+C (SIGINT to the process group) during the fetch ends with exit 130 and one 'aborted'
    line that names the run, whose row has status failed. The same command then completes the data."""
    data_dir = tmp_path / "data"
    log = tmp_path / "interrupted.stderr"
    returncode = _interrupt_during_fetch(data_dir, log, served)

    last = log.read_text().strip().splitlines()[-1]
    assert returncode == 130, log.read_text()[-3000:]
    assert last.startswith("aborted: the run stopped on Ctrl+C. Run ")
    assert "client has been closed" not in log.read_text()
    assert "is marked failed" in last
    assert _run_statuses(data_dir) == ["failed"]

    done = run_cli([*ARGS, "--data-dir", str(data_dir)], served)
    assert done.returncode == 0, done.stderr[-3000:]
    assert warehouse_digest(data_dir / "warehouse.duckdb") == uninterrupted["warehouse"]
    assert _run_statuses(data_dir) == ["failed", "success"]


def test_ctrl_c_keeps_temporary_server_until_exit(served: dict, tmp_path) -> None:
    """Without PREFECT_API_URL, Prefect starts a temporary server in the run's process group.
    Ctrl+C must not stop it before the run has recorded its end: the run then waited about
    160 s on Prefect's retries. The run exits with 130, and the server is gone afterwards."""
    env = _env_with_temporary_server(served, tmp_path)
    data_dir = tmp_path / "data"
    log = tmp_path / "interrupted.stderr"
    returncode = _interrupt_during_fetch(data_dir, log, env)

    text = log.read_text()
    server = re.search(r"Starting temporary server on (http://127\.0\.0\.1:\d+)", text)
    assert returncode == 130, text[-3000:]
    assert text.strip().splitlines()[-1].startswith("aborted: the run stopped on Ctrl+C. Run ")
    assert server is not None, text[-3000:]
    assert f"Stopping temporary server on {server.group(1)}" in text
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.group(1)}/api/health", timeout=5)


def test_sigterm_run_exit_143_stops_server(served: dict, tmp_path) -> None:
    """SIGTERM during the fetch, without PREFECT_API_URL: the run records its end, exits with 143
    and one 'stopped' line that names the run, and Prefect's temporary server stops with it.
    SIGTERM's default action would skip the exit handlers that do the last two."""
    env = _env_with_temporary_server(served, tmp_path)
    data_dir = tmp_path / "data"
    log = tmp_path / "terminated.stderr"
    returncode = _interrupt_during_fetch(data_dir, log, env, sigterm=True)

    text = log.read_text()
    last = text.strip().splitlines()[-1]
    server = re.search(r"Starting temporary server on (http://127\.0\.0\.1:\d+)", text)
    assert returncode == 143, text[-3000:]
    assert last.startswith("stopped: the run received SIGTERM. Run "), last
    # Running fetch batches end before the HTTP client closes, so no request fails on it.
    assert "client has been closed" not in text
    assert "Bad file descriptor" not in text
    assert "is marked failed" in last
    assert _run_statuses(data_dir) == ["failed"]
    assert server is not None, text[-3000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.group(1)}/api/health", timeout=5)
