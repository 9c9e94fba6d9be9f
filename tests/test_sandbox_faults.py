"""Tests of the sandbox's fault injection over real HTTP on 127.0.0.1, with plain httpx.

Most tests force a mode with rate 1, so attempts 1 and 2 of a URL are faulted and attempt 3
is clean; the clean attempt is the reference the faulted bodies are compared with.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx
import pytest

from terralayr_etl.categories import CATEGORIES, PRODUCTS
from terralayr_etl.config import Settings, load_settings
from terralayr_etl.errors import ConfigError
from terralayr_etl.sandbox.app import create_app
from terralayr_etl.sandbox.engine import EUR_CATEGORIES, Engine
from terralayr_etl.sandbox.fault_bodies import UNKNOWN_CATEGORY, UNKNOWN_MAX_VALUE_EUR
from terralayr_etl.sandbox.fault_plan import (
    CLEAN_ATTEMPT_INTERVAL,
    CORRECTION_FACTOR,
    DEFAULT_RATES,
    MODES,
    RATED_MODES,
    FaultPlan,
)
from terralayr_etl.sandbox.faults import parse_fault_spec
from terralayr_etl.sandbox.organisation import Organisation, load_organisation
from terralayr_etl.sandbox.server import SandboxServer
from terralayr_etl.timeutil import isoformat_z, local_midnight

PORTFOLIO = "0b531721-327f-5b79-a7f9-564c2da27bb2"
PORTFOLIO_MEMBERS = (
    "4cb93bd8-f878-53a7-8357-0d731ba0cbd8",
    "3134728a-98e3-5e8c-b014-a0cafa737233",
    "2dc48861-66c5-577f-8ac7-362f76dc29ce",
)
VA_ID = PORTFOLIO_MEMBERS[1]
VA_PATH = f"/revenue-reporting/virtual-assets/{VA_ID}/datapoints"
PORTFOLIO_PATH = f"/revenue-reporting/portfolios/{PORTFOLIO}/datapoints"
FEW_CATEGORIES = "revenue_wholesale,buy_volume_wholesale,sell_vwap_wholesale,annual_price_tolling"
FIRST_DAY = date(2024, 10, 20)
QUARTER_HOUR = timedelta(minutes=15)
FAULTS_LOGGER = "terralayr_etl.sandbox.faults"


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="module")
def organisation() -> Organisation:
    return load_organisation()


@pytest.fixture(scope="module")
def shared_engine(organisation: Organisation) -> Engine:
    """One engine for the servers without corrections, so its cache is filled once."""
    return Engine(organisation)


@pytest.fixture
def serve(settings, organisation, shared_engine) -> Iterator:
    """Start sandboxes with a fault spec; every server started is stopped after the test."""
    servers: list[SandboxServer] = []

    def start(faults: str | None, engine: Engine | None = None) -> SandboxServer:
        server = SandboxServer(settings, organisation, faults=faults, engine=engine or shared_engine).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _client(server: SandboxServer, timeout: float = 10.0) -> httpx.Client:
    """An httpx client for the server with a fresh access token; open it with ``with``."""
    organisation = server.organisation
    response = httpx.post(
        f"{server.base_url}/auth/public/authenticate",
        json={"username": organisation.username, "password": organisation.password},
    )
    response.raise_for_status()
    headers = {"Authorization": f"Bearer {response.json()['access_token']}"}
    return httpx.Client(base_url=server.base_url, timeout=timeout, headers=headers)


def _window(first: date, days: int = 1) -> dict[str, str]:
    """The start and inclusive end of the local days ``[first, first + days)``, as the client sends them."""
    end = local_midnight(first + timedelta(days=days)) - QUARTER_HOUR
    return {"start": isoformat_z(local_midnight(first)), "end": isoformat_z(end)}


def _datapoint_params(first: date = FIRST_DAY, days: int = 1, resolution: str = "15min", categories: str | None = FEW_CATEGORIES) -> dict[str, str]:
    params = {**_window(first, days), "resolution": resolution}
    if categories:
        params["datapoints"] = categories
    return params


def _plan(server: SandboxServer) -> FaultPlan:
    return server.app.state.fault_plan


def _values(body: dict) -> dict[str, list]:
    return {name: [point["value"] for point in points] for name, points in body["data"].items()}


def _by_period(body: dict) -> dict[str, dict[datetime, float | None]]:
    result: dict[str, dict[datetime, float | None]] = {}
    for name, points in body["data"].items():
        result[name] = {datetime.fromisoformat(point["timestamp"]): point["value"] for point in points}
    return result


# Spec parsing


def test_parse_fault_spec_all_enables_every_mode():
    plan = parse_fault_spec("all", seed=3)

    assert plan.modes == MODES
    assert plan.rates == DEFAULT_RATES
    assert plan.token_lifetime_seconds == 5.0
    assert plan.slow_seconds == 3.0
    assert plan.corrections is not None
    assert plan.corrections.after_seconds == 0.0
    assert plan.seed == 3


def test_parse_fault_spec_numbers_and_overrides():
    plan = parse_fault_spec(" all , 429=0.25, slow=0.5:1.5, expiry=7, corrections=30, seed=11, 500=0 ", seed=3)

    assert plan.rates["429"] == 0.25
    assert plan.rates["500"] == 0.0
    assert plan.rates["slow"] == 0.5
    assert plan.slow_seconds == 1.5
    assert plan.token_lifetime_seconds == 7.0
    assert plan.corrections.after_seconds == 30.0
    assert plan.seed == 11
    assert plan.rates["502"] == DEFAULT_RATES["502"]


def test_parse_fault_spec_single_mode_uses_default_rate():
    plan = parse_fault_spec("truncate,missing=1", seed=3)

    assert plan.modes == ("truncate", "missing")
    assert plan.rates == {"truncate": DEFAULT_RATES["truncate"], "missing": 1.0}
    assert plan.token_lifetime_seconds is None
    assert plan.corrections is None


@pytest.mark.parametrize(
    "spec, item",
    [
        ("429=0.1,bogus", "bogus"),
        ("429=1.5", "429=1.5"),
        ("500=-0.1", "500=-0.1"),
        ("503=often", "503=often"),
        ("429=", "429="),
        ("expiry=0", "expiry=0"),
        ("corrections=-1", "corrections=-1"),
        ("slow=0.1:never", "slow=0.1:never"),
        ("seed=abc", "seed=abc"),
        ("seed", "seed"),
        ("all=0.5", "all=0.5"),
        ("502=nan", "502=nan"),
    ],
)
def test_parse_fault_spec_invalid_item_raises_config_error(spec: str, item: str):
    with pytest.raises(ConfigError) as raised:
        parse_fault_spec(spec, seed=1)

    message = str(raised.value)
    assert repr(item) in message
    for mode in RATED_MODES:
        assert mode in message
    assert "expiry" in message
    assert "corrections" in message


def test_create_app_invalid_spec_raises_config_error(settings, organisation, shared_engine):
    with pytest.raises(ConfigError, match="'reboot=0.1'"):
        create_app(settings, organisation, shared_engine, faults="429=0.1,reboot=0.1")


def test_arm_corrections_without_mode_raises_config_error():
    with pytest.raises(ConfigError, match="corrections"):
        parse_fault_spec("429", seed=1).arm_corrections()


# Status faults


@pytest.mark.parametrize(
    "mode, status, code",
    [("429", 429, "rate_limited"), ("429date", 429, "rate_limited"), ("500", 500, "internal_error"),
     ("502", 502, "bad_gateway"), ("503", 503, "service_unavailable")],
)
def test_status_fault_fires_until_clean_attempt(serve, caplog, mode: str, status: int, code: str):
    caplog.set_level(logging.INFO, logger=FAULTS_LOGGER)
    server = serve(f"{mode}=1")
    params = _datapoint_params()

    with _client(server) as client:
        responses = [client.get(VA_PATH, params=params) for _ in range(CLEAN_ATTEMPT_INTERVAL + 1)]

    assert [response.status_code for response in responses] == [status, status, 200, status]
    assert responses[0].json()["error"]["code"] == code
    assert mode in responses[0].json()["error"]["message"]
    assert set(responses[2].json()["data"]) == set(FEW_CATEGORIES.split(","))
    assert _plan(server).counts()[mode] == 3
    assert [event.attempt for event in _plan(server).events()] == [1, 2, 4]
    assert f"Injected fault {mode} into GET {VA_PATH} (attempt 2)" in caplog.text


def test_429_retry_after_is_one_second(serve):
    server = serve("429=1")

    with _client(server) as client:
        response = client.get(VA_PATH, params=_datapoint_params())

    assert response.headers["Retry-After"] == "1"


def test_429date_retry_after_is_http_date_one_second_ahead(serve):
    server = serve("429date=1")

    with _client(server) as client:
        response = client.get(VA_PATH, params=_datapoint_params())
    wait_seconds = (parsedate_to_datetime(response.headers["Retry-After"]) - datetime.now(UTC)).total_seconds()

    assert response.headers["Retry-After"].endswith(" GMT")
    assert 0.5 <= wait_seconds <= 2.0


def test_authenticate_endpoint_is_never_faulted(serve):
    server = serve("all,429=1,500=1,reset=1,truncate=1,strings=1")
    organisation = server.organisation
    body = {"username": organisation.username, "password": organisation.password}

    with httpx.Client(base_url=server.base_url) as client:
        responses = [client.post("/auth/public/authenticate", json=body) for _ in range(5)]

    assert [response.status_code for response in responses] == [200] * 5
    assert all(isinstance(response.json()["expires_in"], int) for response in responses)
    assert sum(_plan(server).counts().values()) == 0


# Transport faults


def test_reset_closes_connection_mid_body(serve):
    server = serve("reset=1")
    uvicorn_records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = uvicorn_records.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    params = _datapoint_params()

    try:
        with _client(server) as client:
            outcomes = []
            for _ in range(CLEAN_ATTEMPT_INTERVAL):
                try:
                    outcomes.append(client.get(VA_PATH, params=params))
                except httpx.RemoteProtocolError as error:
                    outcomes.append(error)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)

    assert isinstance(outcomes[0], httpx.RemoteProtocolError)
    assert isinstance(outcomes[1], httpx.RemoteProtocolError)
    assert "incomplete" in str(outcomes[0]) or "complete message body" in str(outcomes[0])
    assert outcomes[2].status_code == 200
    assert _plan(server).counts()["reset"] == 2
    assert not [record for record in uvicorn_records if record.levelno >= logging.ERROR]


def test_truncate_cuts_body_with_matching_length(serve):
    server = serve("truncate=1")
    params = _datapoint_params()

    with _client(server) as client:
        responses = [client.get(VA_PATH, params=params) for _ in range(CLEAN_ATTEMPT_INTERVAL)]
    truncated, clean = responses[0], responses[2]

    assert truncated.status_code == 200
    assert int(truncated.headers["Content-Length"]) == len(truncated.content)
    assert len(truncated.content) < len(clean.content)
    assert clean.content.startswith(truncated.content)
    with pytest.raises(json.JSONDecodeError):
        json.loads(truncated.content)
    assert json.loads(clean.content)["nextCursor"] is None
    assert _plan(server).counts()["truncate"] == 2


def test_slow_delays_past_short_read_timeout(serve):
    delay_seconds = 0.6
    server = serve(f"slow=1:{delay_seconds}")
    params = _datapoint_params()

    with _client(server, timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.get(VA_PATH, params=params)
        started = time.monotonic()
        slow = client.get(VA_PATH, params=params, timeout=5.0)
        slow_seconds = time.monotonic() - started
        started = time.monotonic()
        clean = client.get(VA_PATH, params=params)
        clean_seconds = time.monotonic() - started

    assert slow.status_code == 200
    assert slow.content == clean.content
    assert slow_seconds >= delay_seconds
    assert clean_seconds < delay_seconds
    assert _plan(server).counts()["slow"] == 2


# Content faults


def test_missing_drops_exactly_one_category(serve):
    server = serve("missing=1")
    params = _datapoint_params(categories=None)

    with _client(server) as client:
        faulted, _, clean = (client.get(VA_PATH, params=params).json() for _ in range(CLEAN_ATTEMPT_INTERVAL))
    dropped = set(clean["data"]) - set(faulted["data"])

    assert len(dropped) == 1
    assert set(faulted["data"]) <= set(clean["data"])
    assert len(faulted["metaData"]) == len(clean["metaData"]) - 1
    assert dropped.isdisjoint(entry["dataPointName"] for entry in faulted["metaData"])
    assert _values(faulted) == {name: values for name, values in _values(clean).items() if name not in dropped}
    assert _plan(server).counts()["missing"] == 2


def test_unknown_adds_exactly_one_category(serve):
    server = serve("unknown=1")
    params = _datapoint_params()

    with _client(server) as client:
        faulted, _, clean = (client.get(VA_PATH, params=params).json() for _ in range(CLEAN_ATTEMPT_INTERVAL))
    added = set(faulted["data"]) - set(clean["data"])
    unknown_points = faulted["data"][UNKNOWN_CATEGORY]
    unknown_meta = [entry for entry in faulted["metaData"] if entry["dataPointName"] == UNKNOWN_CATEGORY]

    assert added == {UNKNOWN_CATEGORY}
    assert {name: values for name, values in _values(faulted).items() if name != UNKNOWN_CATEGORY} == _values(clean)
    assert [point["timestamp"] for point in unknown_points] == [point["timestamp"] for point in clean["data"]["revenue_wholesale"]]
    assert all(0.0 <= point["value"] <= UNKNOWN_MAX_VALUE_EUR for point in unknown_points)
    assert len({point["value"] for point in unknown_points}) > 1
    assert unknown_meta == [{**clean["metaData"][0], "dataPointName": UNKNOWN_CATEGORY, "unit": "EUR"}]
    assert _plan(server).counts()["unknown"] == 2


def test_unknown_values_are_deterministic_by_seed(serve):
    params = _datapoint_params()
    bodies = []
    for spec in ("unknown=1,seed=5", "unknown=1,seed=5", "unknown=1,seed=6"):
        with _client(serve(spec)) as client:
            bodies.append(client.get(VA_PATH, params=params).json()["data"][UNKNOWN_CATEGORY])

    assert bodies[0] == bodies[1]
    assert bodies[0] != bodies[2]


def test_strings_parse_to_fault_free_numbers(serve):
    server = serve("strings=1")
    params = _datapoint_params(days=2, categories=None)

    with _client(server) as client:
        faulted, _, clean = (client.get(VA_PATH, params=params).json() for _ in range(CLEAN_ATTEMPT_INTERVAL))
    faulted_values = _values(faulted)
    clean_values = _values(clean)

    assert set(faulted_values) == set(clean_values)
    for name, values in faulted_values.items():
        assert all(value is None or isinstance(value, str) for value in values), name
        assert [None if value is None else float(value) for value in values] == clean_values[name], name
    assert any(value is None for values in clean_values.values() for value in values)
    assert _plan(server).counts()["strings"] == 2


def test_strings_quotes_revenue_bucket_values(serve):
    server = serve("strings=1")
    path = f"/revenue-reporting/{VA_ID}/tolling"
    params = {"start": isoformat_z(local_midnight(FIRST_DAY)), "end": isoformat_z(local_midnight(FIRST_DAY + timedelta(days=3)))}

    with _client(server) as client:
        faulted, _, clean = (client.get(path, params=params).json() for _ in range(CLEAN_ATTEMPT_INTERVAL))

    assert len(faulted) == len(clean) == 3
    assert all(isinstance(bucket["revenue"], str) for bucket in faulted)
    assert [float(bucket["revenue"]) for bucket in faulted] == [bucket["revenue"] for bucket in clean]


def test_content_faults_leave_virtual_asset_list_alone(serve, organisation):
    server = serve("missing=1,unknown=1,strings=1")
    path = f"/organisations/{organisation.id}/virtual-assets"

    with _client(server) as client:
        faulted, _, clean = (client.get(path, params=_window(FIRST_DAY)).content for _ in range(CLEAN_ATTEMPT_INTERVAL))

    assert faulted == clean
    assert sum(_plan(server).counts().values()) == 0


# Expiry


def test_expiry_rejects_token_after_lifetime(serve, caplog):
    caplog.set_level(logging.INFO, logger=FAULTS_LOGGER)
    server = serve("expiry=0.4")
    params = _datapoint_params()

    with _client(server) as client:
        fresh = client.get(VA_PATH, params=params)
        time.sleep(0.5)
        expired = client.get(VA_PATH, params=params)
    with _client(server) as client:
        renewed = client.get(VA_PATH, params=params)

    assert fresh.status_code == 200
    assert expired.status_code == 401
    assert expired.json()["error"]["code"] == "invalid_token"
    assert renewed.status_code == 200
    assert renewed.content == fresh.content
    assert _plan(server).counts()["expiry"] == 1
    assert f"Injected fault expiry into GET {VA_PATH} (attempt 2)" in caplog.text


def test_expiry_keeps_documented_expires_in(serve, organisation):
    server = serve("expiry=1")
    body = {"username": organisation.username, "password": organisation.password}

    with httpx.Client(base_url=server.base_url) as client:
        token = client.post("/auth/public/authenticate", json=body).json()

    assert token["expires_in"] == int(organisation.token_lifetime_seconds)


# Determinism


def _observe(client: httpx.Client, params: dict[str, str]) -> tuple:
    """One request as the client sees it: status and body, or the transport error's type."""
    try:
        response = client.get(VA_PATH, params=params)
    except httpx.TransportError as error:
        return (type(error).__name__,)
    return (response.status_code, response.content)


DETERMINISM_PARAMS = [_datapoint_params(first=FIRST_DAY + timedelta(days=offset)) for offset in range(16)]


def _event_keys(server: SandboxServer) -> set[tuple]:
    return {(event.mode, event.query, event.attempt) for event in _plan(server).events()}


@pytest.mark.parametrize("mode", RATED_MODES)
def test_same_seed_faults_same_requests_in_any_order(serve, mode: str):
    spec = f"{mode}=0.5:0.05,seed=11" if mode == "slow" else f"{mode}=0.5,seed=11"
    sequential = serve(spec)
    concurrent = serve(spec)

    with _client(sequential) as client:
        seen_sequential = [_observe(client, params) for params in DETERMINISM_PARAMS]
    with _client(concurrent) as client, ThreadPoolExecutor(max_workers=8) as pool:
        seen_concurrent = list(pool.map(lambda params: _observe(client, params), reversed(DETERMINISM_PARAMS)))[::-1]

    faulted = _event_keys(sequential)
    assert 0 < len(faulted) < len(DETERMINISM_PARAMS)
    assert _event_keys(concurrent) == faulted
    if mode != "429date":
        # A 429date body is equal but its Retry-After date depends on the time of the request.
        assert seen_concurrent == seen_sequential


def test_other_seed_faults_other_requests(serve):
    faulted = []
    for spec in ("500=0.5,seed=11", "500=0.5,seed=12"):
        server = serve(spec)
        with _client(server) as client:
            for params in DETERMINISM_PARAMS:
                _observe(client, params)
        faulted.append(_event_keys(server))

    assert faulted[0] != faulted[1]


# Late corrections


def _corrections_server(serve, organisation: Organisation, spec: str = "corrections") -> SandboxServer:
    # A fresh engine, because the plan's corrections hook is set on the engine.
    return serve(spec, engine=Engine(organisation))


def _get_json(client: httpx.Client, path: str, params: dict[str, str]) -> dict:
    response = client.get(path, params=params)
    response.raise_for_status()
    return response.json()


def test_corrections_scale_eur_categories_of_served_days(serve, organisation):
    server = _corrections_server(serve, organisation)
    served = _datapoint_params(days=2, categories=None)
    later = _datapoint_params(days=4, categories=None)

    with _client(server) as client:
        before = _by_period(_get_json(client, VA_PATH, served))
        _plan(server).arm_corrections()
        after = _by_period(_get_json(client, VA_PATH, later))
    with _client(serve(None)) as client:
        uncorrected = _by_period(_get_json(client, VA_PATH, later))

    corrected_periods = set(before["revenue_total_revenue"])
    assert _plan(server).corrections.corrected_days == {FIRST_DAY, FIRST_DAY + timedelta(days=1)}
    assert len(corrected_periods) == 2 * 96
    for name, values in after.items():
        for period, value in values.items():
            if period not in corrected_periods:
                assert value == uncorrected[name][period], (name, period)
            elif name in EUR_CATEGORIES and value is not None:
                assert math.isclose(value, CORRECTION_FACTOR * before[name][period], rel_tol=1e-12), (name, period)
            else:
                assert value == before[name][period], (name, period)
    assert any(after["revenue_wholesale"][period] != before["revenue_wholesale"][period] for period in corrected_periods)
    assert _plan(server).counts()["corrections"] == 1


def _revenue_identity_gaps(values: dict[str, dict[datetime, float | None]]) -> list[float]:
    """Return |total - sum of products| and |wholesale - (sell VWAP x sell - buy VWAP x buy)| per period."""
    gaps = []
    for period, total in values["revenue_total_revenue"].items():
        products = sum(values[f"revenue_{product}"][period] or 0.0 for product in PRODUCTS)
        gaps.append(abs(total - products))
        sell = (values["sell_vwap_wholesale"][period] or 0.0) * values["sell_volume_wholesale"][period]
        buy = (values["buy_vwap_wholesale"][period] or 0.0) * values["buy_volume_wholesale"][period]
        gaps.append(abs(values["revenue_wholesale"][period] - (sell - buy)))
    return gaps


@pytest.mark.parametrize("resolution", ["15min", "hourly", "daily"])
def test_corrections_keep_identities_and_aggregates(serve, organisation, resolution: str):
    server = _corrections_server(serve, organisation)
    params = _datapoint_params(days=2, resolution=resolution, categories=None)

    with _client(server) as client:
        _get_json(client, VA_PATH, _datapoint_params(days=1, resolution="daily", categories=None))
        _plan(server).arm_corrections()
        portfolio = _by_period(_get_json(client, PORTFOLIO_PATH, params))
        members = [
            _by_period(_get_json(client, f"/revenue-reporting/virtual-assets/{member}/datapoints", params))
            for member in PORTFOLIO_MEMBERS
        ]

    # Only the first day was served before the correction, so the response mixes both kinds.
    assert _plan(server).corrections.corrected_days == {FIRST_DAY}
    assert max(_revenue_identity_gaps(portfolio)) < 1e-6
    for member in members:
        assert max(_revenue_identity_gaps(member)) < 1e-6
    for name, category in CATEGORIES.items():
        if category.over_entities != "sum":
            continue
        for period, value in portfolio[name].items():
            expected = sum(member[name][period] or 0.0 for member in members)
            assert math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-6), (name, period)


def test_corrections_keep_daily_roll_up(serve, organisation):
    server = _corrections_server(serve, organisation)

    with _client(server) as client:
        _get_json(client, PORTFOLIO_PATH, _datapoint_params(days=1, resolution="daily", categories=None))
        _plan(server).arm_corrections()
        quarter_hours = _by_period(_get_json(client, PORTFOLIO_PATH, _datapoint_params(days=2, categories=None)))
        daily = _by_period(_get_json(client, PORTFOLIO_PATH, _datapoint_params(days=2, resolution="daily", categories=None)))

    assert len(daily["revenue_total_revenue"]) == 2
    for name, category in CATEGORIES.items():
        if category.over_time != "sum":
            continue
        for day_start, value in daily[name].items():
            day_end = day_start + timedelta(days=1)
            expected = sum(v or 0.0 for period, v in quarter_hours[name].items() if day_start <= period < day_end)
            assert math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-6), (name, day_start)


def test_corrections_change_revenue_buckets(serve, organisation):
    server = _corrections_server(serve, organisation)
    path = f"/revenue-reporting/{VA_ID}/tolling"
    params = {"start": isoformat_z(local_midnight(FIRST_DAY)), "end": isoformat_z(local_midnight(FIRST_DAY + timedelta(days=2)))}

    with _client(server) as client:
        before = client.get(path, params=params).json()
        _plan(server).arm_corrections()
        after = client.get(path, params=params).json()

    assert [bucket["start"] for bucket in after] == [bucket["start"] for bucket in before]
    for old, new in zip(before, after, strict=True):
        assert old["revenue"] > 0
        assert math.isclose(new["revenue"], CORRECTION_FACTOR * old["revenue"], rel_tol=1e-12)


def test_corrections_start_after_configured_seconds(serve, organisation):
    server = _corrections_server(serve, organisation, spec="corrections=0.5")
    params = _datapoint_params(categories="revenue_wholesale,sell_volume_wholesale")

    with _client(server) as client:
        before = _get_json(client, VA_PATH, params)
        unchanged = _get_json(client, VA_PATH, params)
        time.sleep(0.6)
        after = _get_json(client, VA_PATH, params)

    assert unchanged == before
    assert _values(after)["sell_volume_wholesale"] == _values(before)["sell_volume_wholesale"]
    assert _values(after)["revenue_wholesale"] == pytest.approx(
        [CORRECTION_FACTOR * value for value in _values(before)["revenue_wholesale"]], rel=1e-12
    )
    assert _plan(server).counts()["corrections"] == 1


def test_faults_from_organisation_config():
    import dataclasses

    import httpx as plain_httpx

    from terralayr_etl.sandbox.organisation import load_organisation
    from terralayr_etl.sandbox.server import SandboxServer

    organisation = dataclasses.replace(load_organisation(), faults="503=1")
    with SandboxServer(organisation=organisation) as server:
        token = plain_httpx.post(
            f"{server.base_url}/auth/public/authenticate",
            json={"username": organisation.username, "password": organisation.password},
        ).json()["access_token"]
        response = plain_httpx.get(
            f"{server.base_url}/organisations/{organisation.id}/virtual-assets",
            params={"start": "2024-10-20T00:00:00Z", "end": "2024-10-21T00:00:00Z"},
            headers={"Authorization": f"Bearer {token}"},
        )

    assert response.status_code == 503
    assert server.app.state.fault_plan.counts()["503"] == 1
