"""Run the benchmark workloads and write their results as JSON.

Usage::

    python -m benchmarks.run                  # W1 to W4, writes benchmarks/results/latest.json
    python -m benchmarks.run --only W1,W2     # these workloads; other results in the file stay
    python -m benchmarks.run --quick          # tiny versions in about a minute, to smoke-test the harness

docs/benchmarks.md describes the workloads and the targets. Every server runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from benchmarks.machine import describe_machine
from benchmarks.processes import PrefectServer, SandboxProcess
from benchmarks.replay import decode_only, record, replay
from benchmarks.workloads import BackfillSpec, Session, run_backfill, run_check
from terralayr_etl.config import Credentials, load_settings

logger = logging.getLogger("benchmarks")

WORKLOADS = ("W1", "W2", "W3", "W4")
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "latest.json"

W2_TARGET_VALUES_PER_S = 2_000_000
W2_REPLAYS = 3
"""W2 replays the recording this many times and reports the median run, because the speed of
this machine varied by about 10% from one minute to the next."""
W1_TARGET_FACTOR = 1.5
W3_TARGET_PEAK_MB = 400.0
W3_TARGET_GROWTH = 0.15
W4_TARGET_S = 60.0


@dataclass(frozen=True)
class Plan:
    """The sizes of every workload, full or quick."""

    w1: BackfillSpec
    w3_short: BackfillSpec
    w3_long: BackfillSpec
    w4: BackfillSpec


# Backfills skip the SQL models and checks, which read the whole warehouse, and W1 times
# them on their own with 'terralayr-etl check'. The nightly run (W4) builds and runs them.
_SKIP = ("--skip-checks",)
FULL = Plan(
    w1=BackfillSpec(
        virtual_assets=20, start=date(2024, 3, 1), days=90, latency_ms=50, extra_arguments=_SKIP, warm_sandbox=True
    ),
    w3_short=BackfillSpec(virtual_assets=20, start=date(2024, 1, 1), days=30, latency_ms=50, extra_arguments=_SKIP),
    w3_long=BackfillSpec(virtual_assets=20, start=date(2024, 1, 1), days=360, latency_ms=50, extra_arguments=_SKIP),
    w4=BackfillSpec(virtual_assets=200, start=date(2024, 11, 5), days=1, latency_ms=50, command="run"),
)
QUICK = Plan(
    w1=BackfillSpec(
        virtual_assets=3, start=date(2024, 3, 30), days=2, latency_ms=5, extra_arguments=_SKIP, warm_sandbox=True
    ),
    w3_short=BackfillSpec(virtual_assets=3, start=date(2024, 3, 30), days=1, latency_ms=5, extra_arguments=_SKIP),
    w3_long=BackfillSpec(virtual_assets=3, start=date(2024, 3, 30), days=3, latency_ms=5, extra_arguments=_SKIP),
    w4=BackfillSpec(virtual_assets=6, start=date(2024, 11, 5), days=1, latency_ms=5, command="run"),
)


def run_w2(session: Session, spec: BackfillSpec) -> dict[str, Any]:
    """Record the responses of ``spec`` once (no latency), then replay them from disk.

    Reports the replay with the median values per second of W2_REPLAYS, and all of them.
    """
    organisation = session.organisation(spec.virtual_assets)
    recording = session.work_dir / "recording"
    shutil.rmtree(recording, ignore_errors=True)
    with SandboxProcess(
        virtual_assets=spec.virtual_assets, latency_ms=0, env=session.base_env, log_dir=session.work_dir / "logs"
    ) as sandbox:
        settings = load_settings(organisation.config_dir / "terralayr.toml", base_url=sandbox.base_url)
        credentials = Credentials(
            username=organisation.username, password=organisation.password, organisation_id=organisation.organisation_id
        )
        recorded = record(settings, credentials, spec.start, spec.end, recording)

    replay_dir = session.work_dir / "data" / "w2"
    load_average_before = os.getloadavg()[0]
    replays = []
    for _ in range(W2_REPLAYS):
        shutil.rmtree(replay_dir, ignore_errors=True)
        replays.append(replay(recording, replay_dir))
    result = sorted(replays, key=lambda measured: measured["values_per_s"])[len(replays) // 2]
    decoded = decode_only(recording)
    return {
        **{key: round(value, 2) if isinstance(value, float) else value for key, value in result.items()},
        "values_per_s": round(result["values_per_s"]),
        "replays_values_per_s": [round(measured["values_per_s"]) for measured in replays],
        "recorded": recorded,
        "decode_normalise_values_per_s_one_thread": round(decoded["values_per_s"]),
        "load_average_before": round(load_average_before, 2),
    }


def run_w3(session: Session, plan: Plan) -> dict[str, Any]:
    """Run the W1 shape at a short and a long range and compare their peak RSS."""
    short = run_backfill(session, plan.w3_short, "w3-short")
    long = run_backfill(session, plan.w3_long, "w3-long")
    return {
        "rss_30d_mb": short["peak_rss_mb"],
        "rss_360d_mb": long["peak_rss_mb"],
        "short": short,
        "long": long,
    }


def evaluate_targets(results: dict[str, Any]) -> dict[str, Any]:
    """Compare the results with the targets in docs/benchmarks.md and record which are met."""
    targets: dict[str, Any] = {}
    w1, w2, w3, w4 = (results.get(name) for name in WORKLOADS)
    if w2:
        targets["W2"] = {
            "target_values_per_s": W2_TARGET_VALUES_PER_S,
            "met": w2["values_per_s"] >= W2_TARGET_VALUES_PER_S,
            "ratio": round(w2["values_per_s"] / W2_TARGET_VALUES_PER_S, 2),
        }
    if w1 and w2 and w2.get("values_per_s"):
        cpu_path_s = w1["values"] / w2["values_per_s"]
        bound_s = W1_TARGET_FACTOR * max(w1["network_floor_s"], cpu_path_s)
        targets["W1"] = {
            "w2_time_for_w1_values_s": round(cpu_path_s, 2),
            "target_wall_s": round(bound_s, 2),
            "met": w1["wall_s"] <= bound_s,
            "ratio": round(w1["wall_s"] / bound_s, 2),
        }
        if "cold" in w1:
            # The same backfill while the sandbox generates every body on the same two CPUs.
            targets["W1"]["ratio_with_sandbox_generating"] = round(w1["cold"]["wall_s"] / bound_s, 2)
    if w3:
        growth = w3["rss_360d_mb"] / w3["rss_30d_mb"] - 1 if w3["rss_30d_mb"] else None
        targets["W3"] = {
            "target_peak_mb": W3_TARGET_PEAK_MB,
            "growth": round(growth, 3) if growth is not None else None,
            "met": w3["rss_360d_mb"] < W3_TARGET_PEAK_MB and growth is not None and growth <= W3_TARGET_GROWTH,
        }
    if w4:
        targets["W4"] = {"target_wall_s": W4_TARGET_S, "met": w4["wall_s"] < W4_TARGET_S}
    return targets


def _base_env(work_dir: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TERRALAYR_") and name != "PREFECT_API_URL"
    }
    env.update(
        {
            "PREFECT_HOME": str(work_dir / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
    )
    return env


def run_benchmarks(selected: list[str], plan: Plan, work_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Run the selected workloads in order and return their results and start times by name."""
    env = _base_env(work_dir)
    results: dict[str, Any] = {}
    started: dict[str, str] = {}
    with PrefectServer(home=work_dir / "prefect-home", env=env, log_dir=work_dir / "logs") as prefect:
        session = Session(work_dir=work_dir, base_env=env, prefect=prefect)
        for name in selected:
            logger.info("Running %s", name)
            started[name] = datetime.now(UTC).isoformat(timespec="seconds")
            if name == "W1":
                results["W1"] = run_backfill(session, plan.w1, "w1")
                results["W1"]["models_and_checks"] = run_check(session, plan.w1, "w1", "w1-check")
            elif name == "W2":
                results["W2"] = run_w2(session, plan.w1)
            elif name == "W3":
                results["W3"] = run_w3(session, plan)
            elif name == "W4":
                results["W4"] = run_backfill(session, plan.w4, "w4")
            logger.info("%s: %s", name, json.dumps(results[name], default=str))
    return results, started


def _parse_only(text: str | None) -> list[str]:
    if not text:
        return list(WORKLOADS)
    names = [name.strip().upper() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        raise SystemExit(f"error: unknown workloads {unknown} in --only; use a comma-separated subset of {list(WORKLOADS)}")
    return [name for name in WORKLOADS if name in names]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the workloads and write the results file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated workloads to run, e.g. W1,W2 (default: all)")
    parser.add_argument("--quick", action="store_true", help="run tiny versions of each workload (about a minute)")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"results file to update (default: {RESULTS_PATH} for full runs; quick runs only print "
        "their results unless this is given)",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="folder for data, logs and the recording, kept after the run (default: a new temp folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder used without --work-dir")
    arguments = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # W2 records and replays in this process; a line per request and window would bury the figures.
    for name in ("httpx", "terralayr_etl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    selected = _parse_only(arguments.only)
    plan = QUICK if arguments.quick else FULL
    work_dir = arguments.work_dir or Path(tempfile.mkdtemp(prefix="terralayr-bench-"))
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    output = arguments.output or (None if arguments.quick else RESULTS_PATH)

    try:
        results, started = run_benchmarks(selected, plan, work_dir)
    finally:
        if not arguments.keep and arguments.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    document = json.loads(output.read_text()) if output and output.exists() else {}
    document.update(results)
    document["targets"] = evaluate_targets(document)
    # "date" is when each workload started, not when this file was written.
    runs = {name: describe_machine() | {"date": started[name], "quick": arguments.quick} for name in selected}
    document.setdefault("runs", {}).update(runs)
    print(json.dumps({name: document[name] for name in selected} | {"targets": document["targets"]}, indent=2, default=str))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"Results written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
