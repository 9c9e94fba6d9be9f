"""Counters of what the API client did, shared by the threads of one fetch run."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields

COUNTER_NAMES = ("requests", "retries", "authentications", "retry_after_capped", "windows_split")


@dataclass
class FetchStats:
    """Thread-safe counters of one ApiClient.

    ``requests`` counts every attempt of an API call, retries included and authentication
    calls excluded. ``retries`` counts scheduled retries, ``authentications`` successful
    authentications, ``retry_after_capped`` Retry-After waits cut to
    ``retry.max_retry_after_seconds``, and ``windows_split`` windows halved after a
    ``range_too_large`` rejection.
    """

    requests: int = 0
    retries: int = 0
    authentications: int = 0
    retry_after_capped: int = 0
    windows_split: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, counter: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter named ``counter``."""
        if counter not in COUNTER_NAMES:
            raise ValueError(f"unknown counter {counter!r}; use one of {list(COUNTER_NAMES)}")
        with self._lock:
            setattr(self, counter, getattr(self, counter) + amount)

    def snapshot(self) -> dict[str, int]:
        """Return a consistent copy of all counters."""
        with self._lock:
            return {item.name: getattr(self, item.name) for item in fields(self) if item.name in COUNTER_NAMES}
