"""Settings: every field documented; layering defaults < refinery.toml < REFINERY_* env < flags."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from refinery.errors import ConfigurationError
from refinery.settings import Settings, load_settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _doc_rows() -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in DOC.read_text("utf-8").splitlines():
        m = re.match(r"^\|\s*`(\w+)`\s*\|\s*`(\w+)`\s*\|\s*(.+?)\s*\|\s*(.+?)\s*\|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4))
    return rows


def test_every_setting_is_documented_with_its_variable_and_default() -> None:
    rows = _doc_rows()
    fields = Settings.model_fields
    assert set(rows) == set(fields), f"document these in docs/configuration.md: {sorted(set(fields) - set(rows))}; remove: {sorted(set(rows) - set(fields))}"
    for name, field in fields.items():
        env, default, meaning = rows[name]
        assert env == f"REFINERY_{name.upper()}"
        assert field.description, f"{name} needs a description"
        assert len(meaning) > 20, f"{name}: say what it means"
        value_of_default = field.get_default(call_default_factory=True)
        if value_of_default is None:
            continue
        shown = default.strip("`")
        value = str(value_of_default)
        assert shown == value or shown.endswith(value.lstrip("./")), f"{name}: doc says {shown}, code says {value}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import os

    for k in list(os.environ):
        if k.upper().startswith("REFINERY_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults(clean_env: Path) -> None:
    s = load_settings()
    assert (s.port, s.host, s.unplanned_events) == (8088, "127.0.0.1", "accept")
    assert s.plans_dir == s.data_dir / "tracking-plans"


def test_layers_file_then_env_then_flags(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "refinery.toml").write_text('[refinery]\nport = 9001\nhost = "0.0.0.0"\nlog_level = "DEBUG"\nduckdb_threads = 3\n')
    s = load_settings()
    assert (s.port, s.host, s.log_level, s.duckdb_threads) == (9001, "0.0.0.0", "DEBUG", 3)

    monkeypatch.setenv("REFINERY_PORT", "9002")
    monkeypatch.setenv("refinery_log_level", "WARNING")  # env names are case-insensitive
    s = load_settings()
    assert (s.port, s.host, s.log_level, s.duckdb_threads) == (9002, "0.0.0.0", "WARNING", 3)

    s = load_settings(port=9003, host=None)  # a flag left unset does not override
    assert (s.port, s.host) == (9003, "0.0.0.0")


def test_config_file_from_the_environment_and_top_level_keys(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = clean_env / "elsewhere.toml"
    cfg.write_text('unplanned_events = "quarantine"\ntracking_plans_dir = "/srv/plans"\n')
    monkeypatch.setenv("REFINERY_CONFIG", str(cfg))
    s = load_settings()
    assert s.unplanned_events == "quarantine" and s.plans_dir == Path("/srv/plans")
    monkeypatch.setenv("REFINERY_CONFIG", str(clean_env / "missing.toml"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings()


def test_bad_settings_name_the_setting(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "refinery.toml").write_text("[refinery]\nprot = 1\n")
    with pytest.raises(ConfigurationError, match="unknown setting.*prot"):
        load_settings()
    (clean_env / "refinery.toml").write_text("[refinery\n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_settings()
    (clean_env / "refinery.toml").unlink()
    monkeypatch.setenv("REFINERY_UNPLANNED_EVENTS", "drop")
    with pytest.raises(ConfigurationError, match="REFINERY_UNPLANNED_EVENTS"):
        load_settings()
