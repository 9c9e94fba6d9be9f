"""The benchmark workloads: a pipeline process against a sandbox process, measured apart.

A backfill workload starts ``terralayr-etl sandbox --virtual-assets N --latency-ms L``, then
runs ``terralayr-etl backfill`` (or ``run``) with a config folder for that synthetic
organisation, and measures the pipeline's wall time, CPU time and peak RSS, the sandbox's
CPU time and the Prefect server's CPU time over the same interval.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from benchmarks.config_dir import BenchOrganisation, write_config_dir
from benchmarks.processes import BenchmarkError, PrefectServer, SandboxProcess, cli_command, run_measured
from terralayr_etl.config import load_settings


@dataclass(frozen=True)
class BackfillSpec:
    """One pipeline run against the synthetic organisation."""

    virtual_assets: int
    start: date
    days: int
    latency_ms: float
    command: str = "backfill"
    """``backfill`` or ``run``; both take ``--start`` and ``--end``."""
    extra_arguments: tuple[str, ...] = ()
    warm_sandbox: bool = False
    """Run once to fill the sandbox's response cache, then measure a second run."""

    @property
    def end(self) -> date:
        return self.start + timedelta(days=self.days)


@dataclass
class Session:
    """State shared by the workloads of one benchmark invocation."""

    work_dir: Path
    base_env: dict[str, str]
    prefect: PrefectServer

    def organisation(self, virtual_assets: int) -> BenchOrganisation:
        folder = self.work_dir / "config" / f"synthetic-{virtual_assets}"
        return write_config_dir(folder, virtual_assets)

    def pipeline_env(self, organisation: BenchOrganisation, base_url: str) -> dict[str, str]:
        return {
            **self.base_env,
            "TERRALAYR_CONFIG_DIR": str(organisation.config_dir),
            "TERRALAYR_BASE_URL": base_url,
            "TERRALAYR_USERNAME": organisation.username,
            "TERRALAYR_PASSWORD": organisation.password,
            "TERRALAYR_ORGANISATION_ID": organisation.organisation_id,
            "PREFECT_API_URL": self.prefect.api_url,
        }


def run_backfill(session: Session, spec: BackfillSpec, name: str) -> dict[str, Any]:
    """Run one backfill workload and return its measurements.

    With ``spec.warm_sandbox`` the sandbox keeps every rendered body, the same command runs
    once into a folder of its own first (its figures under ``"cold"``), and the returned
    figures are the second run's, whose requests the sandbox serves from its cache.
    """
    organisation = session.organisation(spec.virtual_assets)
    with SandboxProcess(
        virtual_assets=spec.virtual_assets,
        latency_ms=spec.latency_ms,
        env=session.base_env,
        log_dir=session.work_dir / "logs",
        cache_mb=SANDBOX_CACHE_MB if spec.warm_sandbox else 0,
    ) as sandbox:
        env = session.pipeline_env(organisation, sandbox.base_url)
        cold = _measure_backfill(session, spec, sandbox, env, f"{name}-cold") if spec.warm_sandbox else None
        result = _measure_backfill(session, spec, sandbox, env, name)
    if cold is not None:
        result["cold"] = {key: cold[key] for key in _COLD_FIGURES}
    return result


# A warmed sandbox keeps W1's 746 MB of bodies.
SANDBOX_CACHE_MB = 2048
_COLD_FIGURES = ("wall_s", "values", "peak_rss_mb", "pipeline_cpu_s", "sandbox_cpu_s", "prefect_server_cpu_s", "stages_s")


def _measure_backfill(
    session: Session, spec: BackfillSpec, sandbox: SandboxProcess, env: dict[str, str], name: str
) -> dict[str, Any]:
    data_dir = session.work_dir / "data" / name
    settings = load_settings(Path(env["TERRALAYR_CONFIG_DIR"]) / "terralayr.toml")
    concurrency = settings.api.max_concurrency
    command = cli_command(
        spec.command,
        "--start", spec.start.isoformat(),
        "--end", spec.end.isoformat(),
        "--data-dir", str(data_dir),
        *spec.extra_arguments,
    )  # fmt: skip
    load_average_before = os.getloadavg()[0]
    sandbox_cpu_before = sandbox.cpu_seconds()
    prefect_cpu_before = session.prefect.cpu_seconds()
    measured = run_measured(command, env=env, log_dir=session.work_dir / "logs", name=name)
    sandbox_cpu_s = sandbox.cpu_seconds() - sandbox_cpu_before
    prefect_cpu_s = session.prefect.cpu_seconds() - prefect_cpu_before

    # Exit status 1 means a check failed, which still measures the whole run.
    if measured.returncode not in (0, 1):
        raise BenchmarkError(f"{name}: the pipeline exited with status {measured.returncode}: {measured.stderr[-3000:]}")
    run = _last_run(data_dir / "warehouse.duckdb")
    # A run recorded as failed measures nothing, whatever its exit status.
    if run["status"] not in ("success", "checks_failed"):
        raise BenchmarkError(f"{name}: the run ended with status {run['status']}: {measured.stderr[-3000:]}")
    values = run["rows"] or 0
    requests = run["requests"] or 0
    return {
        "command": " ".join(["terralayr-etl", *command[1:]]),
        "virtual_assets": spec.virtual_assets,
        "sandbox_cache": spec.warm_sandbox,
        "days": spec.days,
        "latency_ms": spec.latency_ms,
        "status": run["status"],
        "exit_status": measured.returncode,
        "wall_s": round(measured.wall_s, 2),
        "requests": requests,
        "windows": run["windows"],
        "values": values,
        "values_per_s": round(values / measured.wall_s) if measured.wall_s else 0,
        "network_floor_s": round(requests * spec.latency_ms / 1000 / concurrency, 2),
        "max_concurrency": concurrency,
        "peak_rss_mb": round(measured.peak_rss_mb, 1),
        "pipeline_cpu_s": round(measured.cpu_s, 2),
        "sandbox_cpu_s": round(sandbox_cpu_s, 2),
        "sandbox_cpu_share": round(sandbox_cpu_s / measured.wall_s, 3) if measured.wall_s else 0.0,
        "prefect_server_cpu_s": round(prefect_cpu_s, 2),
        "stages_s": stage_durations(measured.stderr),
        "peak_rss_by_stage_mb": stage_peak_rss(measured.stderr, measured.rss_samples),
        # Other processes on the machine stretch wall times; the 1-minute load average before
        # the run shows whether they were busy.
        "load_average_before": round(load_average_before, 2),
        "check_failures": run["failed_checks"],
    }


def run_check(session: Session, spec: BackfillSpec, source: str, name: str) -> dict[str, Any]:
    """Time ``terralayr-etl check`` (build the SQL models, run the checks) on the warehouse of ``source``."""
    organisation = session.organisation(spec.virtual_assets)
    data_dir = session.work_dir / "data" / source
    env = session.pipeline_env(organisation, "http://127.0.0.1:9")
    command = cli_command("check", "--data-dir", str(data_dir))
    measured = run_measured(command, env=env, log_dir=session.work_dir / "logs", name=name)
    if measured.returncode not in (0, 1):
        raise BenchmarkError(f"{name}: terralayr-etl check exited with status {measured.returncode}: {measured.stderr[-3000:]}")
    return {
        "command": " ".join(["terralayr-etl", *command[1:]]),
        "exit_status": measured.returncode,
        "wall_s": round(measured.wall_s, 2),
        "peak_rss_mb": round(measured.peak_rss_mb, 1),
        "cpu_s": round(measured.cpu_s, 2),
    }


def _last_run(warehouse_path: Path) -> dict[str, Any]:
    if not warehouse_path.exists():
        raise BenchmarkError(f"the pipeline wrote no warehouse at {warehouse_path}")
    connection = duckdb.connect(str(warehouse_path), read_only=True)
    try:
        row = connection.execute(
            "select status, windows, requests, rows, json_extract(check_summary, '$.failed')::bigint "
            "from runs order by started_at desc limit 1"
        ).fetchone()
    finally:
        connection.close()
    if row is None:
        raise BenchmarkError(f"the warehouse {warehouse_path} records no run")
    return dict(zip(("status", "windows", "requests", "rows", "failed_checks"), row, strict=True))


_LOG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) \w+ [\w.]+: (.*)$", re.MULTILINE)
_STAGE_MARKS = {
    "flow_start": re.compile(r"^Beginning flow run"),
    "planned": re.compile(r"^Planned [\d,]+ request windows"),
    "fetched": re.compile(r"^Fetched ([\d,]+) of \1 windows"),
    "loaded": re.compile(r"^Loaded [\d,]+ rows from [\d,]+ Parquet files"),
    "models_built": re.compile(r"^Built \d+ SQL models"),
    "checked": re.compile(r"^Checks: [\d,]+ comparisons"),
    "flow_end": re.compile(r"^Finished in state"),
}


_STAGES = {
    "discover": ("flow_start", "planned"),
    "fetch": ("planned", "fetched"),
    "load": ("fetched", "loaded"),
    "models": ("loaded", "models_built"),
    "checks": ("models_built", "checked"),
}


def _stage_marks(log_text: str) -> dict[str, datetime]:
    """Return the local time of each stage marker line, parsed from the log's asctime."""
    marks: dict[str, datetime] = {}
    for stamp, message in _LOG_LINE.findall(log_text):
        for name, pattern in _STAGE_MARKS.items():
            if pattern.search(message):
                # The last "Finished in state" line is the flow's, after every task's.
                if name not in marks or name == "flow_end":
                    marks[name] = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
    return marks


def stage_durations(log_text: str) -> dict[str, float | None]:
    """Derive stage durations in seconds from the pipeline's log lines.

    Each stage runs from one marker line to the next; a stage whose marker is missing (a log
    message reworded, or a stage skipped) is None.
    """
    marks = _stage_marks(log_text)

    def between(first: str, second: str) -> float | None:
        if first in marks and second in marks:
            return round((marks[second] - marks[first]).total_seconds(), 2)
        return None

    durations = {f"{stage}_s": between(*bounds) for stage, bounds in _STAGES.items()}
    durations["flow_s"] = between("flow_start", "flow_end")
    return durations


def stage_peak_rss(log_text: str, samples: list[tuple[float, float]]) -> dict[str, float | None]:
    """Return the largest sampled RSS in MB within each stage, and before the flow started.

    The log's asctime is local time, as are naive datetimes' ``timestamp()``, so both sides
    compare as Unix times.
    """
    marks = {name: stamp.timestamp() for name, stamp in _stage_marks(log_text).items()}

    def peak(first: float | None, second: float | None) -> float | None:
        if first is None or second is None:
            return None
        inside = [rss for when, rss in samples if first <= when <= second]
        return round(max(inside), 1) if inside else None

    start = samples[0][0] if samples else None
    peaks = {"startup_mb": peak(start, marks.get("flow_start"))}
    for stage, (first, second) in _STAGES.items():
        peaks[f"{stage}_mb"] = peak(marks.get(first), marks.get(second))
    return peaks
