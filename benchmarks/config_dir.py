"""A config folder for the sandbox's synthetic organisation, for ``TERRALAYR_CONFIG_DIR``.

No endpoint lists fleets or physical assets, so the pipeline reads them from
``terralayr.toml``. The folder written here copies the project's ``config/terralayr.toml`` and
replaces its fleets and physical assets with those of ``synthetic_organisation(N)``, which is
what ``terralayr-etl sandbox --virtual-assets N`` serves.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terralayr_etl.config import PROJECT_ROOT
from terralayr_etl.sandbox.organisation import Organisation, synthetic_organisation

SYNTHETIC_SEED = 1
"""The seed ``terralayr-etl sandbox --virtual-assets N`` uses when ``--seed`` is not given."""


@dataclass(frozen=True)
class BenchOrganisation:
    """Environment and config folder with which a pipeline process reaches the synthetic organisation."""

    config_dir: Path
    organisation_id: str
    username: str
    password: str
    virtual_assets: int


def write_config_dir(folder: Path, virtual_assets: int) -> BenchOrganisation:
    """Write ``folder/terralayr.toml`` for ``synthetic_organisation(virtual_assets)``."""
    organisation = synthetic_organisation(virtual_assets, seed=SYNTHETIC_SEED)
    with (PROJECT_ROOT / "config" / "terralayr.toml").open("rb") as handle:
        settings = tomllib.load(handle)
    settings.update(_entity_tables(organisation))

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "terralayr.toml").write_text(dump_toml(settings), encoding="utf-8")
    return BenchOrganisation(
        config_dir=folder,
        organisation_id=organisation.id,
        username=organisation.username,
        password=organisation.password,
        virtual_assets=virtual_assets,
    )


def _entity_tables(organisation: Organisation) -> dict[str, list[dict[str, Any]]]:
    fleets = [
        {"id": fleet_id, "name": f"Synthetic fleet {index + 1}", "portfolio_ids": list(portfolio_ids)}
        for index, (fleet_id, portfolio_ids) in enumerate(organisation.fleets.items())
    ]
    physical_assets = [
        {"id": asset_id, "name": f"Synthetic physical asset {index + 1}", "virtual_asset_ids": list(member_ids)}
        for index, (asset_id, member_ids) in enumerate(organisation.physical_assets.items())
    ]
    return {"fleets": fleets, "physical_assets": physical_assets}


def dump_toml(document: dict[str, Any]) -> str:
    """Serialise the TOML subset that the settings use: scalars, arrays, tables, arrays of tables."""
    lines: list[str] = []
    _dump_table(document, [], lines)
    return "\n".join(lines).strip() + "\n"


def _dump_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    nested = []
    for key, value in table.items():
        if isinstance(value, dict):
            nested.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            nested.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")

    for key, value in nested:
        if isinstance(value, dict):
            lines.extend(["", f"[{'.'.join(_key(part) for part in [*path, key])}]"])
            _dump_table(value, [*path, key], lines)
            continue
        for item in value:
            lines.extend(["", f"[[{'.'.join(_key(part) for part in [*path, key])}]]"])
            _dump_table(item, [*path, key], lines)


def _key(key: str) -> str:
    if key.replace("_", "").replace("-", "").isalnum():
        return key
    return _value(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    # tomllib returns TOML dates and times as datetime objects, whose ISO form is valid TOML.
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")
