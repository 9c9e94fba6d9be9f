"""Exit status of a finished run, from its summary."""

from __future__ import annotations

import pytest

from terralayr_etl.run_report import exit_status


def _summary(status="success", failed_checks=0, quarantined=0):
    return {"status": status, "checks": {"failed": failed_checks}, "report": {"quarantined_payloads": quarantined}}


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        (_summary(), 0),
        (_summary(failed_checks=2), 1),
        (_summary(status="failed", quarantined=1), 3),
        (_summary(quarantined=5), 4),
        (_summary(failed_checks=1, quarantined=5), 1),
    ],
)
def test_exit_status_by_outcome(summary, expected):
    assert exit_status(summary) == expected
