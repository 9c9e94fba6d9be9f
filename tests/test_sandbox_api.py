"""The sandbox HTTP API over real loopback HTTP: auth, virtual assets, data points, limits."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import pytest

from terralayr_etl.categories import CATEGORY_NAMES
from terralayr_etl.config import load_settings
from terralayr_etl.sandbox.app import ResponseCache
from terralayr_etl.sandbox.organisation import load_organisation
from terralayr_etl.sandbox.server import SandboxServer
from terralayr_etl.timeutil import LOCAL_TZ, local_midnight

VA_01 = "38421b10-96fe-569f-8d56-bff0ee2dc95b"
VA_09_ENDS_2024_10_25 = "b3a73934-377f-5beb-9dcd-55e5f0beca24"
FLEET = "bde7e50b-3cd6-5c9b-bd68-56395f915f1f"


def _token(sandbox: SandboxServer) -> str:
    organisation = sandbox.organisation
    response = httpx.post(
        f"{sandbox.base_url}/auth/public/authenticate",
        json={"username": organisation.username, "password": organisation.password},
    )
    assert response.status_code == 200
    return response.json()["access_token"]


def _get(sandbox: SandboxServer, path: str, token: str | None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{sandbox.base_url}{path}", params=params, headers=headers, timeout=30)


def _datapoints_path(entity_type: str, entity_id: str) -> str:
    return load_settings().api.paths.datapoints(entity_type).format(entity_id=entity_id)


def test_authenticate_returns_documented_fields(sandbox):
    organisation = sandbox.organisation
    response = httpx.post(
        f"{sandbox.base_url}/auth/public/authenticate",
        json={"username": organisation.username, "password": organisation.password},
    )

    body = response.json()
    assert response.status_code == 200
    assert set(body) == {"access_token", "expires_in", "id_token", "refresh_token", "scope", "token_type"}
    assert body["expires_in"] == organisation.token_lifetime_seconds
    assert body["token_type"] == "Bearer"


def test_authenticate_wrong_password_is_401_json(sandbox):
    response = httpx.post(
        f"{sandbox.base_url}/auth/public/authenticate",
        json={"username": sandbox.organisation.username, "password": "not-the-password"},
    )

    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "invalid_credentials"
    assert "not-the-password" not in response.text


def test_request_without_token_is_401(sandbox):
    path = f"/organisations/{sandbox.organisation.id}/virtual-assets"

    missing = _get(sandbox, path, None)
    unknown = _get(sandbox, path, "made-up-token")

    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_token"
    assert unknown.status_code == 401
    assert unknown.json()["error"]["code"] == "invalid_token"


def test_token_expires_after_expires_in():
    organisation = dataclasses.replace(load_organisation(), token_lifetime_seconds=1)
    with SandboxServer(organisation=organisation) as sandbox:
        token = _token(sandbox)
        path = f"/organisations/{organisation.id}/virtual-assets"

        fresh = _get(sandbox, path, token)
        time.sleep(1.2)
        expired = _get(sandbox, path, token)

    assert fresh.status_code == 200
    assert expired.status_code == 401
    assert expired.json()["error"]["code"] == "invalid_token"


def test_virtual_assets_default_window_excludes_ended_asset(sandbox):
    token = _token(sandbox)
    path = f"/organisations/{sandbox.organisation.id}/virtual-assets"

    default_window = {asset["id"] for asset in _get(sandbox, path, token).json()}
    historical = {
        asset["id"]
        for asset in _get(sandbox, path, token, start="2024-10-20T00:00:00Z", end="2024-10-21T00:00:00Z").json()
    }

    # VA-09 ended on 2024-10-25, so only an explicit historical window lists it.
    assert VA_09_ENDS_2024_10_25 in historical
    assert VA_09_ENDS_2024_10_25 not in default_window
    assert VA_01 in default_window


def test_virtual_asset_object_has_documented_units(sandbox):
    token = _token(sandbox)
    path = f"/organisations/{sandbox.organisation.id}/virtual-assets/{VA_01}"

    asset = _get(sandbox, path, token).json()

    assert asset["id"] == VA_01
    assert asset["unitsPower"] == "kW"
    assert asset["unitsEnergy"] == "kWh"
    assert asset["start"].endswith("Z")


def test_datapoints_inclusive_end_and_all_categories(sandbox):
    token = _token(sandbox)

    response = _get(
        sandbox,
        _datapoints_path("virtual_asset", VA_01),
        token,
        start="2024-10-21T00:00:00Z",
        end="2024-10-21T00:30:00Z",
        resolution="15min",
    )

    body = response.json()
    assert set(body["data"]) == set(CATEGORY_NAMES)
    stamps = [point["timestamp"] for point in body["data"]["revenue_wholesale"]]
    assert stamps == ["2024-10-21T00:00:00Z", "2024-10-21T00:15:00Z", "2024-10-21T00:30:00Z"]
    assert {meta["dataPointName"] for meta in body["metaData"]} == set(CATEGORY_NAMES)
    assert body["nextCursor"] is None


def test_datapoints_daily_follow_berlin_days(sandbox):
    token = _token(sandbox)

    response = _get(
        sandbox,
        _datapoints_path("fleet", FLEET),
        token,
        start="2024-10-25T22:00:00Z",
        end="2024-10-27T23:00:00Z",
        resolution="daily",
        datapoints="revenue_total_revenue",
    )

    stamps = [point["timestamp"] for point in response.json()["data"]["revenue_total_revenue"]]
    assert stamps == ["2024-10-25T22:00:00Z", "2024-10-26T22:00:00Z", "2024-10-27T23:00:00Z"]


def test_datapoints_range_over_limit_is_400(sandbox):
    token = _token(sandbox)
    max_days = load_settings().api.max_range_days["15min"]
    start = local_midnight(datetime(2024, 10, 1, tzinfo=LOCAL_TZ).date())

    response = _get(
        sandbox,
        _datapoints_path("virtual_asset", VA_01),
        token,
        start=start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        end=(start + timedelta(days=max_days + 1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        resolution="15min",
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "range_too_large"
    assert f"{max_days:g}" in response.json()["error"]["message"]


def test_datapoints_unknown_entity_is_404(sandbox):
    token = _token(sandbox)

    response = _get(
        sandbox,
        _datapoints_path("portfolio", "00000000-0000-0000-0000-000000000000"),
        token,
        start="2024-10-21T00:00:00Z",
        end="2024-10-21T01:00:00Z",
        resolution="hourly",
    )

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_datapoints_cursor_pages_cover_range_once():
    organisation = dataclasses.replace(load_organisation(), page_max_values=len(CATEGORY_NAMES) * 10)
    with SandboxServer(organisation=organisation) as sandbox:
        token = _token(sandbox)
        params = {"start": "2024-10-21T00:00:00Z", "end": "2024-10-21T11:45:00Z", "resolution": "15min"}
        stamps, pages, cursor = [], 0, None
        while True:
            query = {**params, **({"cursor": cursor} if cursor else {})}
            body = _get(sandbox, _datapoints_path("virtual_asset", VA_01), token, **query).json()
            stamps += [point["timestamp"] for point in body["data"]["revenue_wholesale"]]
            pages += 1
            cursor = body["nextCursor"]
            if cursor is None:
                break

    assert pages == 5
    assert len(stamps) == 48
    assert len(set(stamps)) == 48


def test_same_seed_serves_same_bytes():
    params = {"start": "2024-10-26T22:00:00Z", "end": "2024-10-27T22:45:00Z", "resolution": "15min"}
    path = _datapoints_path("portfolio", load_organisation().virtual_assets[0].portfolio_id)

    def fetch(seed: int) -> bytes:
        with SandboxServer(seed=seed) as sandbox:
            return _get(sandbox, path, _token(sandbox), **params).content

    bodies = [fetch(11), fetch(11)]
    other_seed = fetch(12)

    assert bodies[0] == bodies[1]
    assert bodies[0] != other_seed
    points = msgspec.json.decode(bodies[0])["data"]["revenue_total_revenue"]
    assert len(points) == 100


@pytest.mark.parametrize("product", ["wholesale", "ancillary", "tolling", "vba"])
def test_revenue_buckets_are_daily(sandbox, product):
    token = _token(sandbox)
    path = load_settings().api.paths.revenue(product).format(virtual_asset_id=VA_01)

    buckets = _get(sandbox, path, token, start="2024-10-25T22:00:00Z", end="2024-10-27T23:00:00Z").json()

    assert [bucket["start"] for bucket in buckets] == ["2024-10-25T22:00:00Z", "2024-10-26T22:00:00Z"]
    assert buckets[1]["end"] == "2024-10-27T23:00:00Z"
    assert all(bucket["currency"] == "EUR" for bucket in buckets)


def test_revenue_buckets_match_daily_datapoints(sandbox):
    token = _token(sandbox)
    path = load_settings().api.paths.revenue("wholesale").format(virtual_asset_id=VA_01)
    window = {"start": "2024-10-25T22:00:00Z", "end": "2024-10-27T23:00:00Z"}

    buckets = _get(sandbox, path, token, **window).json()
    daily = _get(
        sandbox,
        _datapoints_path("virtual_asset", VA_01),
        token,
        start=window["start"],
        end="2024-10-26T22:00:00Z",
        resolution="daily",
        datapoints="revenue_wholesale",
    ).json()["data"]["revenue_wholesale"]

    assert [bucket["revenue"] for bucket in buckets] == pytest.approx([point["value"] for point in daily], abs=1e-9)
    assert datetime.fromisoformat(buckets[0]["start"]).astimezone(UTC) == datetime(2024, 10, 25, 22, tzinfo=UTC)


def test_response_cache_repeats_same_bytes():
    data_path = _datapoints_path("virtual_asset", VA_01)
    revenue_path = load_settings().api.paths.revenue("wholesale").format(virtual_asset_id=VA_01)
    window = {"start": "2024-10-25T22:00:00Z", "end": "2024-10-27T23:00:00Z"}

    with SandboxServer(seed=11) as plain:
        token = _token(plain)
        expected = [
            _get(plain, data_path, token, **window, resolution="15min").content,
            _get(plain, revenue_path, token, **window).content,
        ]
    with SandboxServer(seed=11, cache_mb=64) as cached:
        token = _token(cached)
        first = [
            _get(cached, data_path, token, **window, resolution="15min").content,
            _get(cached, revenue_path, token, **window).content,
        ]
        again = [
            _get(cached, data_path, token, **window, resolution="15min").content,
            _get(cached, revenue_path, token, **window).content,
        ]
        without_token = _get(cached, data_path, None, **window, resolution="15min")
        other_day = _get(cached, data_path, token, start=window["start"], end="2024-10-26T22:00:00Z", resolution="15min")
        cache = cached.app.state.api.cache

    assert first == expected
    assert again == expected
    assert cache.hits == 2
    assert cache.size == sum(len(body) for body in expected) + len(other_day.content)
    assert without_token.status_code == 401
    assert other_day.status_code == 200
    assert other_day.content != expected[0]


def test_response_cache_skips_errors_corrections():
    with SandboxServer(cache_mb=64, faults="corrections=0") as corrected:
        token = _token(corrected)
        path = _datapoints_path("virtual_asset", VA_01)
        for _ in range(2):
            _get(corrected, path, token, start="2024-10-25T22:00:00Z", end="2024-10-26T21:45:00Z", resolution="hourly")
        corrected_cache = corrected.app.state.api.cache
    with SandboxServer(cache_mb=64) as sandbox:
        token = _token(sandbox)
        missing = _get(sandbox, _datapoints_path("virtual_asset", "not-an-asset"), token,
                       start="2024-10-25T22:00:00Z", end="2024-10-26T21:45:00Z", resolution="hourly")  # fmt: skip
        too_long = _get(sandbox, _datapoints_path("virtual_asset", VA_01), token,
                        start="2024-01-01T00:00:00Z", end="2024-12-01T00:00:00Z", resolution="15min")  # fmt: skip
        cache = sandbox.app.state.api.cache

    assert (corrected_cache.size, corrected_cache.hits) == (0, 0)
    assert (missing.status_code, too_long.status_code) == (404, 400)
    assert cache.size == 0


def test_response_cache_drops_oldest_body():
    cache = ResponseCache(max_bytes=10)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"

    cache.put("c", b"cccc")
    cache.put("too-large", b"x" * 11)

    assert cache.get("b") is None
    assert cache.get("too-large") is None
    assert (cache.get("a"), cache.get("c")) == (b"aaaa", b"cccc")
    assert cache.size == 8


def test_sandbox_command_reports_stop(tmp_path):
    executable = Path(sys.executable).with_name("terralayr-etl")
    output = tmp_path / "sandbox.out"
    with output.open("w") as handle:
        process = subprocess.Popen([str(executable), "sandbox", "--port", "0"], stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Sandbox listening on" not in output.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        url = output.read_text().split("Sandbox listening on ", 1)[1].split()[0]
        assert httpx.get(f"{url}/organisations/x/virtual-assets", timeout=10).status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)

    assert process.returncode == 0, output.read_text()
    assert f"Sandbox on {url} stopped" in output.read_text()
