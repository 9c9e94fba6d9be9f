"""Retry rules for API requests: the failures that are retried and the wait before each retry.

``RetryPolicy`` is a stamina backoff hook: stamina runs the attempts and sleeps, and the hook
decides per failure whether to retry and returns the wait, so every retry is logged with the
exact wait it gets.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from terralayr_etl.config import RetrySettings
from terralayr_etl.fetch_stats import FetchStats
from terralayr_etl.responses import TransientResponseError

logger = logging.getLogger("terralayr_etl.client")

RETRYABLE_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    # Raised when the server closes the connection before the body is complete.
    httpx.RemoteProtocolError,
)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Return the wait in seconds that a ``Retry-After`` header requests, or None.

    The header is either a number of seconds or an HTTP date. A date in the past means no
    wait. An unparsable value returns None, so the caller falls back to its own backoff.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        # HTTP dates are in GMT, but parsedate_to_datetime returns a naive datetime for "-0000".
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_seconds(settings: RetrySettings, retry_number: int) -> float:
    """Return the exponential wait with jitter before retry number ``retry_number`` (from 1)."""
    exponential = settings.wait_initial_seconds * 2 ** (retry_number - 1)
    jitter = random.uniform(0, settings.wait_jitter_seconds)
    return min(settings.wait_max_seconds, exponential + jitter)


class RetryPolicy:
    """Stamina backoff hook for one API call: decides per failure whether to retry, and the wait.

    Returns False (reraise) for failures that are not transient, after ``retry.attempts``
    attempts, and when the wait would end after ``retry.total_timeout_seconds``. Otherwise
    returns the wait in seconds: the server's ``Retry-After`` capped at
    ``retry.max_retry_after_seconds``, else exponential backoff with jitter.
    """

    def __init__(self, settings: RetrySettings, stats: FetchStats, method: str, path: str):
        self.settings = settings
        self.stats = stats
        self.method = method
        self.path = path
        self.attempts_made = 0
        self.started = time.monotonic()

    def elapsed_seconds(self) -> float:
        """Seconds since the first attempt started."""
        return time.monotonic() - self.started

    def __call__(self, exc: Exception) -> bool | float:
        self.attempts_made += 1
        if not isinstance(exc, (TransientResponseError, *RETRYABLE_TRANSPORT_ERRORS)):
            return False
        if self.attempts_made >= self.settings.attempts:
            return False

        wait = self._wait_for(exc)
        if self.elapsed_seconds() + wait >= self.settings.total_timeout_seconds:
            logger.warning(
                "%s %s failed (%s) and a retry in %.2f s would pass retry.total_timeout_seconds=%g; giving up",
                self.method,
                self.path,
                describe_failure(exc, self.path),
                wait,
                self.settings.total_timeout_seconds,
            )
            return False

        self.stats.add("retries")
        logger.warning(
            "%s %s failed (%s); retry %d of %d in %.2f s",
            self.method,
            self.path,
            describe_failure(exc, self.path),
            self.attempts_made,
            self.settings.attempts - 1,
            wait,
        )
        return wait

    def _wait_for(self, exc: Exception) -> float:
        requested = None
        if isinstance(exc, TransientResponseError):
            requested = parse_retry_after(exc.retry_after, datetime.now(UTC))
        if requested is None:
            return backoff_seconds(self.settings, self.attempts_made)

        cap = self.settings.max_retry_after_seconds
        if requested <= cap:
            return requested
        self.stats.add("retry_after_capped")
        logger.warning(
            "%s %s requested Retry-After %.0f s, longer than retry.max_retry_after_seconds=%g; waiting %g s",
            self.method,
            self.path,
            requested,
            cap,
            cap,
        )
        return cap


def describe_failure(exc: Exception, path: str | None = None) -> str:
    """Describe a failed attempt in a few words: the HTTP status or the transport error.

    A status from another request than ``path``, such as the authenticate call made for it,
    names that request.
    """
    if isinstance(exc, TransientResponseError):
        source = "" if exc.path == path else f" from {exc.method} {exc.path}"
        return f"HTTP {exc.status_code}{source}: {exc.server_message}"
    detail = str(exc) or "no detail"
    return f"{type(exc).__name__}: {detail}"
