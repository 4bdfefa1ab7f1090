"""Settings: one override rule (config.py < MTC75_X < --flag), validated once, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import config as shipped_config
from mtc75.errors import ConfigError
from mtc75.settings import Settings, load_settings, parse_properties


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.py"
    path.write_text(body)
    return path


def test_shipped_config_py_matches_the_defaults() -> None:
    defaults = Settings()
    for name in dir(shipped_config):
        if name.isupper():
            assert getattr(shipped_config, name) == getattr(defaults, name), name


def test_precedence_config_then_env_then_flag(tmp_path: Path) -> None:
    path = _config(tmp_path, "MAX_THREAD_COUNT = 10\nPAUSE_INTERVAL = 2\n")
    assert load_settings(path, env={}).MAX_THREAD_COUNT == 10
    assert load_settings(path, env={"MTC75_MAX_THREAD_COUNT": "20"}).MAX_THREAD_COUNT == 20
    s = load_settings(path, env={"MTC75_MAX_THREAD_COUNT": "20"}, flags={"MAX_THREAD_COUNT": "30"})
    assert s.MAX_THREAD_COUNT == 30
    assert s.PAUSE_INTERVAL == 2.0 and isinstance(s.PAUSE_INTERVAL, float)


def test_kafka_bootstrap_servers_env_and_the_more_specific_name(tmp_path: Path) -> None:
    assert load_settings(None, env={"KAFKA_BOOTSTRAP_SERVERS": "h:1"}).BOOTSTRAP_SERVERS == "h:1"
    env = {"KAFKA_BOOTSTRAP_SERVERS": "h:1", "MTC75_BOOTSTRAP_SERVERS": "h:2"}
    assert load_settings(None, env=env).BOOTSTRAP_SERVERS == "h:2"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("MAX_THREAD_COUNT", "0", "invalid MAX_THREAD_COUNT='0' (from --max-thread-count): must be >= 1"),
        ("MAX_THREAD_COUNT", "many", "must be an integer"),
        ("PAUSE_INTERVAL", "0", "must be > 0"),
        ("PROCESSING_SLEEP", "-1", "must be >= 0"),
        ("PROCESSING_SLEEP", "nan", "must be a finite number"),
        ("AUTO_OFFSET_RESET", "oldest", "must be one of earliest, latest, error"),
        ("TOPIC", "  ", "must not be empty"),
    ],
)
def test_bad_flag_values_name_setting_value_and_source(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={}, flags={name: value})
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"from MTC75_MAX_BACKLOG"):
        load_settings(None, env={"MTC75_MAX_BACKLOG": "-5"})


def test_config_file_typo_syntax_error_and_bad_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting MAX_THREADS"):
        load_settings(_config(tmp_path, "MAX_THREADS = 5\n"), env={})
    with pytest.raises(ConfigError, match=r"config.py:2: syntax error"):
        load_settings(_config(tmp_path, "X = 1\nMAX_THREAD_COUNT = = 3\n"), env={})
    with pytest.raises(ConfigError, match=r"invalid CONSUMER_CONFIG"):
        load_settings(_config(tmp_path, "CONSUMER_CONFIG = 'fetch.wait.max.ms=5'\n"), env={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.py", env={})


def test_librdkafka_dicts_layering_and_callers_dicts_untouched(tmp_path: Path) -> None:
    path = _config(tmp_path, "CONSUMER_CONFIG = {'fetch.wait.max.ms': '50', 'client.id': 'a'}\n")
    settings = load_settings(path, env={})
    overrides = {"client.id": "b"}
    conf = settings.consumer_config(overrides)
    assert conf["fetch.wait.max.ms"] == "50"
    assert conf["client.id"] == "b"  # -X wins over CONSUMER_CONFIG
    assert conf["enable.auto.offset.store"] is False
    conf["group.id"] = "changed"
    assert settings.consumer_config()["group.id"] == settings.GROUP_ID
    assert overrides == {"client.id": "b"}
    with pytest.raises(TypeError):
        settings.CONSUMER_CONFIG["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize("key", ["enable.auto.commit", "enable.auto.offset.store"])
@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_auto_commit_and_auto_offset_store_cannot_be_switched_on(key: str, value: str) -> None:
    """Either one would commit fetched-but-unfinished messages: refused from -X and from CONSUMER_CONFIG."""
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}={value} is not supported"):
        Settings().consumer_config({key: value})
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}={value} is not supported"):
        Settings().replace(CONSUMER_CONFIG={key: value}).consumer_config()
    assert Settings().consumer_config({key: "false"})[key] == "false"  # switching it off stays allowed


def test_x_properties_parse_like_kcat() -> None:
    assert parse_properties(["a=1", "b.c=x=y", "d="]) == {"a": "1", "b.c": "x=y", "d": ""}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_properties(["novalue"])


def test_settings_are_frozen_and_replace_validates() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.MAX_THREAD_COUNT = 3  # type: ignore[misc]
    assert s.replace(MAX_THREAD_COUNT=3).MAX_THREAD_COUNT == 3
    with pytest.raises(ConfigError):
        s.replace(MAX_THREAD_COUNT=0)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("import sys\nsys.exit(0)\n", "config.py: called sys.exit(0) while it was read"),
        ("raise SystemExit\n", "called sys.exit(None)"),
        ("raise KeyboardInterrupt\n", "raised KeyboardInterrupt"),
        ("raise GeneratorExit\n", "raised GeneratorExit"),
        ("class E(Exception):\n    def __str__(self):\n        raise RuntimeError\nraise E\n", "raised E while"),
        ("#" * (1 << 20) + "\n", "more than a settings file may have"),
    ],
)
def test_a_config_file_that_exits_or_raises_anything_is_a_config_error(
    tmp_path: Path, body: str, fragment: str
) -> None:
    """At start-up the file runs in this process: an exit or interrupt it raises is its error (exit 2),
    never the script's own exit (sys.exit(0) used to end the script with 0 and no word)."""
    with pytest.raises(ConfigError) as info:
        load_settings(_config(tmp_path, body), env={})
    assert fragment in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(tmp_path, env={})
