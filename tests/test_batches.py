"""Per-entity batches of request windows and the window retries inside a batch.

test_robustness.py runs batches over HTTP against the sandbox. These tests pass a plain
function as the fetch, so that the retry and failure rules run alone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from terralayr_etl.batches import fetch_batch, plan_batches
from terralayr_etl.errors import ApiError, DiskFullError, MalformedResponseError
from terralayr_etl.pipeline import FetchJob, WindowResult
from terralayr_etl.run_report import FailedWindow

START = datetime(2024, 3, 1, tzinfo=UTC)


def _job(entity_id: str, day: int, entity_type: str = "virtual_asset") -> FetchJob:
    return FetchJob(entity_type, entity_id, "hourly", START + timedelta(days=day), START + timedelta(days=day + 1))


def test_plan_batches_per_entity() -> None:
    jobs = [_job("va-a", 0), _job("va-b", 0), _job("va-a", 1), _job("va-a", 2), _job("pf-1", 0, "portfolio"), _job("va-a", 3)]
    jobs.append(jobs[0])  # a job listed twice is fetched twice

    batches = plan_batches(jobs, 2)

    assert [[(job.entity_id, job.window_start.day) for job in batch] for batch in batches] == [
        [("va-a", 1), ("va-a", 2)],
        [("va-a", 3), ("va-a", 4)],
        [("va-a", 1)],
        [("va-b", 1)],
        [("pf-1", 1)],
    ]
    assert sorted(job.describe() for batch in batches for job in batch) == sorted(job.describe() for job in jobs)


def test_plan_batches_rejects_zero_size() -> None:
    with pytest.raises(ValueError, match="windows_per_task is 0; use 1 or more"):
        plan_batches([_job("va-a", 0)], 0)


class _ScriptedFetch:
    """Raise the scripted errors for a job in turn, then return a result; record every call."""

    def __init__(self, errors: dict[FetchJob, list[Exception]]):
        self.errors = {job: list(queue) for job, queue in errors.items()}
        self.calls: list[FetchJob] = []

    def __call__(self, job: FetchJob) -> WindowResult:
        self.calls.append(job)
        queue = self.errors.get(job, [])
        if queue:
            raise queue.pop(0)
        return WindowResult(job, rows=24)


def test_fetch_batch_retries_transient_failure() -> None:
    first, second = _job("va-a", 0), _job("va-a", 1)
    fetch = _ScriptedFetch({first: [ApiError("HTTP 503", status_code=503), ApiError("connection reset")]})

    outcomes = fetch_batch(fetch, [first, second], retries=2, retry_delay_seconds=0)

    assert fetch.calls == [first, first, first, second]
    assert [(type(outcome), outcome.job) for outcome in outcomes] == [(WindowResult, first), (WindowResult, second)]


def test_fetch_batch_fails_window_after_retries() -> None:
    first, second = _job("va-a", 0), _job("va-a", 1)
    fetch = _ScriptedFetch({first: [ApiError("HTTP 500", status_code=500)] * 3})

    outcomes = fetch_batch(fetch, [first, second], retries=2, retry_delay_seconds=0)

    assert fetch.calls == [first, first, first, second]
    assert isinstance(outcomes[0], FailedWindow)
    assert (outcomes[0].job, outcomes[0].error_type, outcomes[0].error) == (first, "ApiError", "HTTP 500")
    assert isinstance(outcomes[1], WindowResult)


@pytest.mark.parametrize(
    "error",
    [ApiError("HTTP 403", status_code=403), MalformedResponseError("the key 'data' is missing")],
    ids=["rejected request", "malformed payload"],
)
def test_fetch_batch_no_retry_when_permanent(error: Exception) -> None:
    job = _job("va-a", 0)
    fetch = _ScriptedFetch({job: [error]})

    (outcome,) = fetch_batch(fetch, [job], retries=2, retry_delay_seconds=0)

    assert fetch.calls == [job]
    assert isinstance(outcome, FailedWindow)
    assert outcome.error_type == type(error).__name__


def test_fetch_batch_raises_bugs() -> None:
    job = _job("va-a", 0)
    fetch = _ScriptedFetch({job: [KeyError("bug")]})

    with pytest.raises(KeyError):
        fetch_batch(fetch, [job], retries=2, retry_delay_seconds=0)


def test_fetch_batch_stops_before_next_window() -> None:
    jobs = [_job("va-a", day) for day in range(3)]
    fetch = _ScriptedFetch({})

    outcomes = fetch_batch(fetch, jobs, should_stop=lambda: len(fetch.calls) >= 1)

    assert fetch.calls == jobs[:1]
    assert [outcome.job for outcome in outcomes] == jobs[:1]


def test_fetch_batch_stops_on_full_disk() -> None:
    first, second = _job("va-a", 0), _job("va-a", 1)
    fetch = _ScriptedFetch({first: [DiskFullError("no space left on the device while writing x.parquet")]})

    with pytest.raises(DiskFullError, match="x.parquet"):
        fetch_batch(fetch, [first, second], retries=2, retry_delay_seconds=0)

    assert fetch.calls == [first]


def test_fetch_batch_logs_failed_window(caplog: pytest.LogCaptureFixture) -> None:
    job = _job("va-a", 0)
    fetch = _ScriptedFetch({job: [MalformedResponseError("the body is not JSON")]})

    with caplog.at_level("WARNING", logger="terralayr_etl.batches"):
        (outcome,) = fetch_batch(fetch, [job], retries=2, retry_delay_seconds=0)

    assert isinstance(outcome, FailedWindow)
    assert [record.getMessage() for record in caplog.records] == [
        f"{job.describe()} failed; the run goes on without it: the body is not JSON"
    ]
