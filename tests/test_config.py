"""Settings precedence and validation: command line > environment > TOML > defaults."""

from pathlib import Path

import pytest

from appliance.config import load_settings
from appliance.errors import ConfigError


def test_command_line_beats_environment_beats_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "appliance.toml"
    toml.write_text('port = 7001\nhost = "127.0.0.2"\n[batching]\nmax_batch_size = 8\n')
    monkeypatch.setenv("APPLIANCE_CONFIG", str(toml))
    monkeypatch.setenv("APPLIANCE_PORT", "7002")
    settings = load_settings()
    assert settings.port == 7002
    assert settings.host == "127.0.0.2"
    assert settings.batching.max_batch_size == 8
    assert load_settings(port=7003).port == 7003


def test_bad_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_PORT", "99999")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.field == "port"


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(config=toml)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(config=tmp_path / "nope.toml")


def test_loopback_detection() -> None:
    assert not load_settings(host="127.0.0.1").listens_beyond_loopback
    assert load_settings(host="0.0.0.0").listens_beyond_loopback


def test_serving_rules_come_from_toml_and_bad_ones_name_the_field(tmp_path: Path) -> None:
    toml = tmp_path / "appliance.toml"
    toml.write_text(
        '[serving]\nmax_loaded_models = 2\nkeep_alive_s = 60\n\n[serving.models.chat]\npin = true\nkeep_alive_s = -1\n'
    )
    settings = load_settings(config=toml)
    assert settings.serving.max_loaded_models == 2 and settings.serving.keep_alive_s == 60
    assert settings.serving.models["chat"].pin and settings.serving.models["chat"].keep_alive_s == -1
    for bad, field in (
        ("[serving]\nkeep_alive_s = -0.5\n", "serving.keep_alive_s"),
        ("[serving]\nmemory_budget_bytes = 10\n", "serving.memory_budget_bytes"),
        ("[serving.models.chat]\npinned = true\n", "serving.models.chat.pinned"),
    ):
        toml.write_text(bad)
        with pytest.raises(ConfigError) as refused:
            load_settings(config=toml)
        assert refused.value.field == field, refused.value.message
