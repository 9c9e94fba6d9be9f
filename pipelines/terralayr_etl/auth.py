"""Bearer-token authentication against the API's authenticate endpoint."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Generator

import httpx

from terralayr_etl.config import Credentials
from terralayr_etl.errors import AuthenticationError, MalformedResponseError
from terralayr_etl.fetch_stats import FetchStats
from terralayr_etl.responses import MAX_REAUTHENTICATIONS, check_response, error_details

logger = logging.getLogger("terralayr_etl.client")

AuthFlow = Generator[httpx.Request, httpx.Response, None]


class BearerTokenAuth(httpx.Auth):
    """Authenticate with username and password, then send ``Authorization: Bearer <token>``.

    The token is reused until ``refresh_margin_seconds`` before its ``expires_in`` runs out.
    A request that gets 401 triggers a re-authentication and is repeated, up to
    ``MAX_REAUTHENTICATIONS`` times. A server that ends tokens before their ``expires_in`` can
    reject the new token too, when the repeated request queues longer than the token lives.
    The API documents no refresh endpoint, so every re-authentication sends username and
    password.

    Safe for the threads that share one ``httpx.Client``: a lock serialises authentication,
    and a generation counter lets a thread whose request failed with an older token reuse the
    token another thread fetched meanwhile instead of authenticating again. Works only with
    the synchronous ``httpx.Client``.
    """

    def __init__(
        self,
        *,
        base_url: str,
        authenticate_path: str,
        credentials: Credentials,
        refresh_margin_seconds: float,
        stats: FetchStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._base_url = base_url
        self._authenticate_path = authenticate_path
        self._authenticate_url = base_url.rstrip("/") + authenticate_path
        self._credentials = credentials
        self._refresh_margin_seconds = refresh_margin_seconds
        self._stats = stats or FetchStats()
        self._clock = clock

        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._generation = 0

    def sync_auth_flow(self, request: httpx.Request) -> AuthFlow:
        token, generation = yield from self._current_token(request)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        # NOTE: the API's docs do not say how a 401 for a missing permission differs from one
        # for an expired token, so the former also costs MAX_REAUTHENTICATIONS logins.
        for _ in range(MAX_REAUTHENTICATIONS):
            if response.status_code != 401:
                return
            token, generation = yield from self._token_after_rejection(request, generation)
            request.headers["Authorization"] = f"Bearer {token}"
            response = yield request

    def auth_flow(self, request: httpx.Request) -> AuthFlow:
        # httpx.AsyncClient would call this through async_auth_flow. The lock would block
        # the event loop, so asynchronous use is rejected instead of half supported.
        raise NotImplementedError("BearerTokenAuth works only with the synchronous httpx.Client")

    def _current_token(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, tuple[str, int]]:
        # The lock stays held while the authenticate request is out, so threads that find
        # the token expired at the same time wait for that one authentication.
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                yield from self._authenticate(request)
            assert self._token is not None
            return self._token, self._generation

    def _token_after_rejection(
        self, request: httpx.Request, rejected_generation: int
    ) -> Generator[httpx.Request, httpx.Response, tuple[str, int]]:
        with self._lock:
            if self._generation == rejected_generation:
                logger.info("%s %s was rejected with HTTP 401; re-authenticating", request.method, request.url.path)
                yield from self._authenticate(request)
            assert self._token is not None
            return self._token, self._generation

    def _authenticate(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        body = {"username": self._credentials.username, "password": self._credentials.password.get_secret_value()}
        extensions = {"timeout": request.extensions["timeout"]} if "timeout" in request.extensions else {}
        issued_at = self._clock()
        response = yield httpx.Request("POST", self._authenticate_url, json=body, extensions=extensions)
        response.read()

        if response.status_code in (401, 403):
            raise AuthenticationError(self._rejection_message(response))
        check_response("POST", self._authenticate_path, response)

        token, lifetime_seconds = self._parse_token(response)
        # A margin at least as long as the lifetime would make every request re-authenticate,
        # so the margin is at most half the lifetime.
        margin_seconds = min(self._refresh_margin_seconds, lifetime_seconds / 2)
        self._token = token
        self._refresh_at = issued_at + lifetime_seconds - margin_seconds
        self._generation += 1
        self._stats.add("authentications")
        logger.info(
            "Authenticated as %r at %s; the token is valid for %.0f s",
            self._credentials.username,
            self._base_url,
            lifetime_seconds,
        )

    def _rejection_message(self, response: httpx.Response) -> str:
        _, server_message = error_details(response)
        password = self._credentials.password.get_secret_value()
        if password:
            server_message = server_message.replace(password, "**********")
        return (
            f"authentication as {self._credentials.username!r} at {self._base_url} was rejected with "
            f"HTTP {response.status_code}: {server_message}; check TERRALAYR_USERNAME and TERRALAYR_PASSWORD"
        )

    def _parse_token(self, response: httpx.Response) -> tuple[str, float]:
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        token = body.get("access_token") if isinstance(body, dict) else None
        lifetime = body.get("expires_in") if isinstance(body, dict) else None
        valid_lifetime = isinstance(lifetime, (int, float)) and not isinstance(lifetime, bool) and lifetime > 0
        if not isinstance(token, str) or not token or not valid_lifetime:
            raise MalformedResponseError(
                f"the authenticate response from {self._authenticate_url} has no string access_token and "
                "positive expires_in; check api.base_url and api.paths.authenticate"
            )
        return token, float(lifetime)
