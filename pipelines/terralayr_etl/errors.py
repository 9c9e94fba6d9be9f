"""Project exceptions. Each message names the value that was wrong and what to do next;
the CLI prints it as one line and exits non-zero."""

from __future__ import annotations

from collections.abc import Iterator


class TerralayrError(Exception):
    """Base class for errors a user can cause or fix."""


def error_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """Yield ``exc`` and the errors it came from (its cause, or else its context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def one_line(error: BaseException) -> str:
    """Return the message of ``error`` on one line.

    DuckDB's messages span several lines (the statement, a caret under the failing part), and
    a closing error line or a JSON field must stay one line.
    """
    return " ".join(str(error).split())


class ConfigError(TerralayrError):
    """A setting, a config file or an environment variable is missing or invalid."""


class InvalidEntityIdError(TerralayrError):
    """An id is not safe to use in a URL path, a file path or SQL."""


class AuthenticationError(TerralayrError):
    """The API rejected the credentials."""


class ApiError(TerralayrError):
    """The API returned an error that retries did not resolve."""

    def __init__(self, message: str, *, status_code: int | None = None, url: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.url = url


class RangeTooLargeError(ApiError):
    """The API rejected a request because its time range is longer than it allows."""


class MalformedResponseError(TerralayrError):
    """A response body could not be parsed into data points.

    ``body``, ``endpoint`` and ``params`` describe the response when the raiser has them, so
    the pipeline can quarantine the payload with its request.
    """

    def __init__(
        self,
        message: str,
        *,
        body: bytes | None = None,
        endpoint: str | None = None,
        params: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.body = body
        self.endpoint = endpoint
        self.params = params


class WarehouseLockedError(TerralayrError):
    """Another process has locked the warehouse."""


class DiskFullError(TerralayrError):
    """The disk has no space left for a file that the pipeline writes.

    Every later write would fail the same way, so the run stops instead of failing window
    after window.
    """
