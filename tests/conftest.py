"""Shared fixtures: a real sandbox on 127.0.0.1 and a real Prefect test server."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def sandbox():
    """The demo organisation served over HTTP on a free loopback port."""
    from terralayr_etl.sandbox.server import SandboxServer

    with SandboxServer() as server:
        yield server


@pytest.fixture
def sandbox_env(sandbox, monkeypatch):
    """Environment that points the pipeline at the sandbox with its demo credentials."""
    organisation = sandbox.organisation
    monkeypatch.setenv("TERRALAYR_BASE_URL", sandbox.base_url)
    monkeypatch.setenv("TERRALAYR_USERNAME", organisation.username)
    monkeypatch.setenv("TERRALAYR_PASSWORD", organisation.password)
    monkeypatch.setenv("TERRALAYR_ORGANISATION_ID", organisation.id)
    return sandbox
