"""Validation of entity ids before they reach a URL path, a file path or SQL."""

from __future__ import annotations

import re

from terralayr_etl.errors import InvalidEntityIdError

# The API's ids are UUIDs. We accept any id made of letters, digits, '-' and '_' (at most
# 64 characters, not starting with '-'), so that ids of other shapes still work, while
# '/', '..', whitespace, quotes and '=' (which would break a hive partition) are rejected.
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def validate_entity_id(value: object, *, what: str = "entity id") -> str:
    """Return ``value`` if it is a safe id, else raise InvalidEntityIdError naming it."""
    if not isinstance(value, str) or not _SAFE_ID.fullmatch(value):
        raise InvalidEntityIdError(
            f"invalid {what} {value!r}: ids may contain only letters, digits, '-' and '_' "
            "(at most 64 characters); check the id in the API response or config"
        )
    return value
