"""Fault modes, the fault spec and the FaultPlan that decides which requests to fault.

Each per-request decision is a hash of (seed, mode, method, path, query string, attempt), where
the attempt counts the requests for the same method, path and query. So the same seed faults
the same requests, whatever order concurrent requests arrive in. Every
``CLEAN_ATTEMPT_INTERVAL``-th attempt of a URL is served without faults, so a client that
retries gets through. ``terralayr_etl.sandbox.faults`` applies the plan to HTTP responses.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date

from terralayr_etl.errors import ConfigError

logger = logging.getLogger("terralayr_etl.sandbox.faults")

STATUS_MODES = ("429", "429date", "500", "502", "503")
FAILURE_MODES = (*STATUS_MODES, "reset", "truncate", "slow")
"""Modes of which at most one fires per request: the first in this order whose draw is below its rate."""
CONTENT_MODES = ("missing", "unknown", "strings")
"""Modes that change a 200 body. Each is drawn on its own, so several can apply to one response."""
RATED_MODES = FAILURE_MODES + CONTENT_MODES
MODES = ("expiry", *RATED_MODES, "corrections")

DEFAULT_RATES: dict[str, float] = {
    "429": 0.05,
    "429date": 0.02,
    "500": 0.02,
    "502": 0.02,
    "503": 0.02,
    "reset": 0.02,
    "truncate": 0.02,
    "slow": 0.01,
    "missing": 0.02,
    "unknown": 0.02,
    "strings": 0.02,
}
"""Probability per request of each rated mode, used for a bare ``MODE`` and for ``all``."""

DEFAULT_SLOW_SECONDS = 3.0
DEFAULT_TOKEN_LIFETIME_SECONDS = 5.0
DEFAULT_CORRECTIONS_AFTER_SECONDS = 0.0
"""0 means that corrections start at the first request after ``FaultPlan.arm_corrections()``."""
CORRECTION_FACTOR = 1.25
"""Factor that late corrections apply to every EUR-denominated category of a corrected day."""
CLEAN_ATTEMPT_INTERVAL = 3
"""Every third attempt of the same method, path and query is never faulted (expiry excepted)."""

# Set by FaultMiddleware for the request it serves: the list collects how many corrected days
# each engine call served, so the middleware can count and log the correction.
corrected_days_served: ContextVar[list[int] | None] = ContextVar("corrected_days_served", default=None)


def _invalid_item(item: str, reason: str) -> ConfigError:
    return ConfigError(
        f"invalid fault item {item!r}: {reason}. Valid items: all, seed=N, expiry[=SECONDS], "
        "corrections[=SECONDS], slow[=RATE[:SECONDS]] and MODE[=RATE] with RATE from 0 to 1 "
        f"for the modes {', '.join(mode for mode in RATED_MODES if mode != 'slow')}"
    )


def _parse_number(item: str, text: str, quantity: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise _invalid_item(item, f"{quantity} {text!r} is not a number") from None
    if not math.isfinite(number):
        raise _invalid_item(item, f"{quantity} {text!r} is not a finite number")
    return number


def _parse_rate(item: str, text: str) -> float:
    rate = _parse_number(item, text, "the rate")
    if not 0.0 <= rate <= 1.0:
        raise _invalid_item(item, f"the rate {text} is outside 0 to 1")
    return rate


def _parse_seconds(item: str, text: str, *, allow_zero: bool) -> float:
    seconds = _parse_number(item, text, "the time in seconds")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "above 0"
        raise _invalid_item(item, f"the time in seconds must be {bound}, not {text}")
    return seconds


def _parse_seed(item: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _invalid_item(item, f"the seed {text!r} is not an integer") from None


def parse_fault_spec(spec: str, *, seed: int) -> FaultPlan:
    """Parse a comma-separated fault spec into a FaultPlan. A later item overrides an earlier one.

    ``seed`` is used unless the spec has a ``seed=N`` item. Raises ConfigError naming the first
    invalid item and listing the valid ones.

    >>> plan = parse_fault_spec("all,429=0.2,slow=0.05:1.5,seed=7", seed=1)
    >>> plan.rates["429"], plan.slow_seconds, plan.seed
    (0.2, 1.5, 7)
    """
    rates: dict[str, float] = {}
    slow_seconds = DEFAULT_SLOW_SECONDS
    token_lifetime_seconds: float | None = None
    corrections_after_seconds: float | None = None

    for raw_item in spec.split(","):
        item = raw_item.strip()
        if not item:
            continue
        name, has_value, value = (part.strip() for part in item.partition("="))
        name = name.lower()
        if has_value and not value:
            raise _invalid_item(item, "the value after '=' is missing")

        if name == "all":
            if has_value:
                raise _invalid_item(item, "'all' takes no value; set a mode's rate with a separate MODE=RATE item")
            rates.update(DEFAULT_RATES)
            token_lifetime_seconds = DEFAULT_TOKEN_LIFETIME_SECONDS
            corrections_after_seconds = DEFAULT_CORRECTIONS_AFTER_SECONDS
        elif name == "seed":
            if not has_value:
                raise _invalid_item(item, "seed needs a value, as in seed=7")
            seed = _parse_seed(item, value)
        elif name == "expiry":
            token_lifetime_seconds = _parse_seconds(item, value, allow_zero=False) if has_value else DEFAULT_TOKEN_LIFETIME_SECONDS
        elif name == "corrections":
            corrections_after_seconds = (
                _parse_seconds(item, value, allow_zero=True) if has_value else DEFAULT_CORRECTIONS_AFTER_SECONDS
            )
        elif name == "slow":
            rate_text, has_seconds, seconds_text = value.partition(":")
            rates["slow"] = _parse_rate(item, rate_text) if has_value else DEFAULT_RATES["slow"]
            if has_seconds:
                slow_seconds = _parse_seconds(item, seconds_text, allow_zero=False)
        elif name in RATED_MODES:
            rates[name] = _parse_rate(item, value) if has_value else DEFAULT_RATES[name]
        else:
            raise _invalid_item(item, f"{name!r} is not a fault mode")

    corrections = None
    if corrections_after_seconds is not None:
        corrections = LateCorrections(after_seconds=corrections_after_seconds)
    return FaultPlan(
        seed=seed,
        rates=rates,
        slow_seconds=slow_seconds,
        token_lifetime_seconds=token_lifetime_seconds,
        corrections=corrections,
    )


class LateCorrections:
    """Late corrections of the delivery days served before a start time.

    The start is ``after_seconds`` after creation, or, with ``after_seconds`` 0, the first
    request after ``arm()``. At the start the set of corrected days is fixed: every local
    delivery day that any data-point or revenue-bucket request touched before. From then on
    the engine scales the EUR categories of those days by ``factor``. Days first served after
    the start stay uncorrected, and there is one correction per plan.
    """

    def __init__(self, *, after_seconds: float, factor: float = CORRECTION_FACTOR, clock: Callable[[], float] = time.monotonic):
        self.after_seconds = after_seconds
        self.factor = factor
        self._clock = clock
        self._lock = threading.Lock()
        self._starts_at: float | None = clock() + after_seconds if after_seconds > 0 else None
        self._served: set[date] = set()
        self._corrected: frozenset[date] | None = None

    def arm(self) -> None:
        """Start the correction at the next request, unless it has started already."""
        with self._lock:
            if self._corrected is None:
                self._starts_at = self._clock()

    @property
    def corrected_days(self) -> frozenset[date]:
        """The corrected local delivery days; empty before the correction starts."""
        with self._lock:
            return self._corrected or frozenset()

    def factors(self, days: Sequence[date]) -> dict[date, float]:
        """Record ``days`` as served and return the factor of each corrected day among them."""
        with self._lock:
            if self._corrected is None and self._starts_at is not None and self._clock() >= self._starts_at:
                self._corrected = frozenset(self._served)
                logger.info(
                    "Late corrections started: EUR values of %d served delivery days are now scaled by %g",
                    len(self._corrected),
                    self.factor,
                )
            if self._corrected is None:
                self._served.update(days)
                return {}
            corrected = {day: self.factor for day in days if day in self._corrected}

        served = corrected_days_served.get()
        if served is not None and corrected:
            served.append(len(corrected))
        return corrected


@dataclass(frozen=True)
class RequestFaults:
    """The faults drawn for one request."""

    attempt: int
    """1 for the first request of this method, path and query, 2 for the first repeat, and so on."""
    failure: str | None
    content: tuple[str, ...]


@dataclass(frozen=True)
class FaultEvent:
    """One injected fault, as logged."""

    mode: str
    method: str
    path: str
    query: str
    attempt: int


class FaultPlan:
    """Fault modes with their rates and parameters, and the state of the faults injected so far."""

    def __init__(
        self,
        *,
        seed: int,
        rates: dict[str, float],
        slow_seconds: float = DEFAULT_SLOW_SECONDS,
        token_lifetime_seconds: float | None = None,
        corrections: LateCorrections | None = None,
    ):
        self.seed = seed
        self.rates = dict(rates)
        self.slow_seconds = slow_seconds
        self.token_lifetime_seconds = token_lifetime_seconds
        self.corrections = corrections
        # The enabled modes, in the order of MODES.
        self.modes: tuple[str, ...] = tuple(
            mode
            for mode in MODES
            if mode in self.rates
            or (mode == "expiry" and token_lifetime_seconds is not None)
            or (mode == "corrections" and corrections is not None)
        )

        self._lock = threading.Lock()
        self._attempts: dict[tuple[str, str, str], int] = {}
        self._counts = dict.fromkeys(self.modes, 0)
        self._events: list[FaultEvent] = []
        self._token_issued_at: dict[str, float] = {}

    def draw(self, mode: str, method: str, path: str, query: str, attempt: int) -> float:
        """Return a number in ``[0, 1)`` that depends only on the seed and the arguments."""
        key = "\x1f".join((str(self.seed), mode, method, path, query, str(attempt)))
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def begin_request(self, method: str, path: str, query: str) -> RequestFaults:
        """Count the request as the next attempt of its URL and draw its faults."""
        with self._lock:
            attempt = self._attempts.get((method, path, query), 0) + 1
            self._attempts[(method, path, query)] = attempt
        if attempt % CLEAN_ATTEMPT_INTERVAL == 0:
            return RequestFaults(attempt, None, ())

        failure = next(
            (
                mode
                for mode in FAILURE_MODES
                if mode in self.rates and self.draw(mode, method, path, query, attempt) < self.rates[mode]
            ),
            None,
        )
        content = tuple(
            mode
            for mode in CONTENT_MODES
            if mode in self.rates and self.draw(mode, method, path, query, attempt) < self.rates[mode]
        )
        return RequestFaults(attempt, failure, content)

    def next_attempt(self, method: str, path: str, query: str) -> int:
        """Return the attempt number the next request of this URL gets, without counting one."""
        with self._lock:
            return self._attempts.get((method, path, query), 0) + 1

    def record(self, mode: str, method: str, path: str, query: str, attempt: int) -> None:
        """Count and log an injected fault."""
        with self._lock:
            self._counts[mode] = self._counts.get(mode, 0) + 1
            self._events.append(FaultEvent(mode, method, path, query, attempt))
        logger.info("Injected fault %s into %s %s (attempt %d)", mode, method, path, attempt)

    def counts(self) -> dict[str, int]:
        """Return the number of injected faults per enabled mode."""
        with self._lock:
            return dict(self._counts)

    def events(self) -> list[FaultEvent]:
        """Return every injected fault so far, in the order injected."""
        with self._lock:
            return list(self._events)

    def arm_corrections(self) -> None:
        """Start the late corrections at the next request (see ``LateCorrections``).

        Raises ConfigError when the plan has no ``corrections`` mode.
        """
        if self.corrections is None:
            raise ConfigError("late corrections are not enabled; add 'corrections' to the fault spec")
        self.corrections.arm()

    def note_token(self, token: str) -> None:
        """Record that the authenticate endpoint issued ``token`` now."""
        with self._lock:
            self._token_issued_at[token] = time.monotonic()

    def token_expired(self, token: str) -> bool:
        """Return True for a token issued more than the expiry lifetime ago."""
        if self.token_lifetime_seconds is None:
            return False
        with self._lock:
            issued_at = self._token_issued_at.get(token)
        return issued_at is not None and time.monotonic() - issued_at >= self.token_lifetime_seconds
