"""Quarantine: response payloads the pipeline could not use, kept with their request and error.

Layout under ``<data_dir>/quarantine/<run_id>/``, one pair of files per event::

    <nnnn>-<label>.json   request (path and query parameters), error, attempt, window
    <nnnn>-<label>.body   the raw response body, when there was one

``<label>`` names the entity, resolution or product and the window start. Request headers are
never stored, so no token reaches these files. Each file is written to a hidden temp name and
renamed, so a reader never sees half a record.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger("terralayr_etl.quarantine")


class Quarantine:
    """The quarantine folder of one run; safe to use from the fetch threads.

    Example::

        quarantine = Quarantine(Path("data"), run_id)
        quarantine.add("virtual_asset-38421b10-15min-2024-10-20", error, request={"path": path, "params": params},
                       body=raw_body, attempt=1)
    """

    def __init__(self, data_dir: Path, run_id: str):
        self.folder = Path(data_dir) / "quarantine" / run_id
        self._sequence = itertools.count(1)
        self._lock = threading.Lock()
        self._count = 0

    @property
    def count(self) -> int:
        """Records written so far."""
        with self._lock:
            return self._count

    def add(
        self,
        label: str,
        error: BaseException | str,
        *,
        request: dict[str, Any],
        body: bytes | None = None,
        attempt: int | None = None,
        window: dict[str, str] | None = None,
    ) -> Path:
        """Write one record and return the path of its JSON file.

        ``label`` becomes part of the file name, so it must be made of validated ids, resolution
        names and ISO dates only. ``request`` contains the path and query parameters, never headers.
        """
        with self._lock:
            number = next(self._sequence)
            self._count += 1
        stem = f"{number:04d}-{label}"
        record = {
            "recorded_at": datetime.now(UTC).isoformat(),
            "request": request,
            "error_type": type(error).__name__ if isinstance(error, BaseException) else None,
            "error": str(error),
            "attempt": attempt,
            "window": window,
            "body_file": f"{stem}.body" if body is not None else None,
            "body_bytes": len(body) if body is not None else None,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        if body is not None:
            _write_atomically(self.folder / f"{stem}.body", body)
        path = self.folder / f"{stem}.json"
        _write_atomically(path, json.dumps(record, indent=2, sort_keys=True).encode())
        logger.warning("Quarantined %s (attempt %s) in %s: %s", label, attempt, path, record["error"])
        return path


def _write_atomically(path: Path, content: bytes) -> None:
    temp_path = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        temp_path.write_bytes(content)
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
