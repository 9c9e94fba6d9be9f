"""No password or access token in anything a run writes, logs or sends to Prefect.

The flow runs against the sandbox with tokens that expire after 0.6 s, so the client
authenticates several times, and with truncated responses, so the quarantine gets payloads.
It sends one request at a time. With 30 ms of latency each, its 37 or 38 sandbox requests (five
runs) take more than a second, so the first token expires during the run however fast the
machine is.
The test searches for the password and for every access token the sandbox issued in: every
file under the data dir, every log record of every logger at DEBUG level, the process's stdout
and stderr, the runs table, and the Prefect flow runs' parameters and logs and all artifacts
read back through the Prefect client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

import duckdb
import pytest
from robust_support import PASSWORD, apply_env, issued_tokens, pipeline_env, serve_small_org, write_small_org

from terralayr_etl.flows import run_nightly

pytestmark = pytest.mark.slow

_DEBUG_LOGGERS = ("", "prefect", "terralayr_etl", "httpx", "httpcore", "stamina", "uvicorn", "filelock")


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Arguments are kept apart from the formatted text, so both are searched.
        self.texts.append(record.getMessage())
        self.texts.append(repr(record.args))
        if record.exc_info:
            self.texts.append(logging.Formatter().formatException(record.exc_info))


@contextmanager
def _every_log_record() -> Iterator[_Collector]:
    """Collect every record at DEBUG level, from the root logger and from the loggers that
    do not pass their records on to it."""
    collector = _Collector()
    manager = logging.Logger.manager
    isolated = [
        logger
        for logger in manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and not logger.propagate
    ]
    targets = [logging.getLogger(), *isolated]
    levels = {name: logging.getLogger(name).level for name in _DEBUG_LOGGERS}
    for target in targets:
        target.addHandler(collector)
    for name in _DEBUG_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield collector
    finally:
        for target in targets:
            target.removeHandler(collector)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _prefect_texts() -> list[str]:
    """Return every flow run's parameters and logs and every artifact, as stored by Prefect."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    texts = []
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(limit=200)
        assert flow_runs, "the Prefect server holds no flow run"
        for flow_run in flow_runs:
            texts.append(json.dumps(flow_run.parameters, default=str))
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), limit=200)
            texts += [entry.message for entry in logs]
        flow_runs_again = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_runs[0].id])))
        assert flow_runs_again[0].id == flow_runs[0].id
        artifacts = client.read_artifacts(limit=200)
        assert artifacts, "the Prefect server holds no artifact"
        texts += [json.dumps(artifact.data, default=str) + str(artifact.description) for artifact in artifacts]
    return texts


def test_run_writes_no_password_or_token(tmp_path_factory: pytest.TempPathFactory, prefect_harness, tmp_path, capfd) -> None:
    org = write_small_org(tmp_path_factory.mktemp("secrets-config"), api={"max_concurrency": 1})
    data_dir = tmp_path / "data"
    with serve_small_org(org, faults="expiry=0.6,truncate=0.2", latency_ms=30) as (server, _):
        monkeypatch = pytest.MonkeyPatch()
        try:
            apply_env(monkeypatch, pipeline_env(org, server.base_url))
            with _every_log_record() as collector:
                summary = run_nightly(start=date(2024, 10, 26), end=date(2024, 10, 28), data_dir=data_dir)
        finally:
            monkeypatch.undo()
        tokens = issued_tokens(server.inner_app)
        counts = server.inner_app.state.fault_plan.counts()
    captured = capfd.readouterr()

    assert summary["status"] in ("success", "checks_failed")
    assert counts["expiry"] > 0
    assert counts["truncate"] > 0
    assert len(tokens) >= 2
    assert summary["quarantine_dir"] is not None
    secrets = [PASSWORD.encode(), *(token.encode() for token in tokens)]

    files = [path for path in data_dir.rglob("*") if path.is_file()]
    assert any(path.suffix == ".parquet" for path in files)
    assert any(path.suffix == ".body" for path in files)
    for path in files:
        content = path.read_bytes()
        for secret in secrets:
            assert secret not in content, f"{path} contains a secret"

    searched = {
        "log records": "\n".join(collector.texts),
        "stdout and stderr": captured.out + captured.err,
        "Prefect": "\n".join(_prefect_texts()),
        "runs table": _runs_table_text(data_dir),
    }
    assert "Authenticated as" in searched["log records"]
    assert "HTTP Request: GET" in searched["log records"]
    for where, text in searched.items():
        for secret in secrets:
            assert secret.decode() not in text, f"the {where} contain a secret"


def _runs_table_text(data_dir) -> str:
    connection = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        return "\n".join(str(row) for row in connection.execute("select * from runs").fetchall())
    finally:
        connection.close()
