"""Settings files: member ids of fleets and physical assets are validated like entity ids."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from terralayr_etl import models, warehouse
from terralayr_etl.config import CONFIG_DIR, PipelineSettings, load_settings
from terralayr_etl.errors import TerralayrError

FIRST_MEMBER = '"38421b10-96fe-569f-8d56-bff0ee2dc95b",'


@pytest.mark.parametrize("unsafe", ["../p", "a/b"])
def test_settings_reject_unsafe_member_id(tmp_path: Path, unsafe: str):
    shutil.copytree(CONFIG_DIR, tmp_path / "config")
    path = tmp_path / "config" / "terralayr.toml"
    text = path.read_text()
    assert FIRST_MEMBER in text
    path.write_text(text.replace(FIRST_MEMBER, f'"{unsafe}",', 1))

    with pytest.raises(TerralayrError) as raised:
        load_settings(path)

    assert unsafe in str(raised.value)
    assert "virtual asset id" in str(raised.value)


@pytest.mark.parametrize("key", ["load_batch_rows", "check_chunk_rows"])
def test_settings_reject_zero_step_rows(tmp_path: Path, key: str):
    shutil.copytree(CONFIG_DIR, tmp_path / "config")
    path = tmp_path / "config" / "terralayr.toml"
    text = path.read_text()
    line = next(line for line in text.splitlines() if line.startswith(f"{key} = "))
    path.write_text(text.replace(line, f"{key} = 0", 1))

    with pytest.raises(TerralayrError) as raised:
        load_settings(path)

    assert f"pipeline.{key}" in str(raised.value)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    ("key", "code_default"),
    [("load_batch_rows", warehouse.ROWS_PER_BATCH), ("check_chunk_rows", models.CHECK_CHUNK_ROWS)],
)
def test_step_rows_defaults_agree(key: str, code_default: int):
    # The sizes appear in three places: the code's constant (used without settings), the
    # settings model's default and the shipped terralayr.toml.
    with (CONFIG_DIR / "terralayr.toml").open("rb") as handle:
        shipped = tomllib.load(handle)["pipeline"]

    assert getattr(PipelineSettings(), key) == code_default
    assert shipped[key] == code_default


def test_settings_reject_negative_waiting_windows(tmp_path: Path):
    shutil.copytree(CONFIG_DIR, tmp_path / "config")
    path = tmp_path / "config" / "terralayr.toml"
    text = path.read_text()
    assert "windows_waiting_for_cpu = 4\n" in text
    path.write_text(text.replace("windows_waiting_for_cpu = 4\n", "windows_waiting_for_cpu = -1\n", 1))

    with pytest.raises(TerralayrError) as raised:
        load_settings(path)

    assert "pipeline.windows_waiting_for_cpu" in str(raised.value)
    assert "-1" in str(raised.value)


def test_waiting_windows_default_agrees():
    with (CONFIG_DIR / "terralayr.toml").open("rb") as handle:
        shipped = tomllib.load(handle)["pipeline"]

    assert shipped["windows_waiting_for_cpu"] == PipelineSettings().windows_waiting_for_cpu == 4
