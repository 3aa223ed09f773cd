"""The settings: flags, their environment variables (a flag wins), bad values as one ConfigError,
and what turns public mode on."""

from __future__ import annotations

import pytest

from optdemo.app.settings import (
    AppSettings,
    parse_settings,
)
from optdemo.core.defaults import DEFAULT_MAX_MESSAGE_CHARS, DEFAULT_MAX_NEW_TOKENS_CAP
from optdemo.core.errors import ConfigError

TINY = "optdemo/tiny-opt"


# ---------------------------------------------------------------------------------- settings
def test_settings_defaults() -> None:
    settings = parse_settings([], env={})
    assert settings == AppSettings()
    assert settings.model == TINY
    assert settings.max_memory is None and settings.offload_folder is None
    assert settings.host == "127.0.0.1" and settings.port is None
    assert settings.dtype == "auto"
    assert not settings.preload and not settings.share and not settings.lock_config
    assert settings.auth == () and settings.allow_models == ()
    assert settings.max_new_tokens_cap == DEFAULT_MAX_NEW_TOKENS_CAP
    assert settings.max_message_chars == DEFAULT_MAX_MESSAGE_CHARS
    assert settings.public is False


def test_settings_from_flags() -> None:
    settings = parse_settings(
        [
            "--model",
            "opt-1.3b",
            "--max-memory",
            "0=5GiB,cpu=20GiB",
            "--offload-folder",
            "/tmp/off",
            "--dtype",
            "float16",
            "--preload",
            "--host",
            "0.0.0.0",
            "--port",
            "7999",
            "--share",
            "--auth",
            "admin:pw",
            "--auth",
            "root:pa:ss",
            "--lock-config",
            "--allow-model",
            "opt-125m",
            "--allow-model",
            "opt-350m",
            "--offload-base",
            "/tmp",
            "--max-new-tokens-cap",
            "128",
            "--max-message-chars",
            "1000",
            "--max-history-turns",
            "5",
            "--queue-size",
            "8",
        ],
        env={},
    )
    assert settings.model == "opt-1.3b"
    assert settings.max_memory == "0=5GiB,cpu=20GiB"
    assert settings.offload_folder == "/tmp/off"
    assert settings.dtype == "float16"
    assert settings.preload and settings.share and settings.lock_config
    assert settings.host == "0.0.0.0" and settings.port == 7999
    assert settings.auth == (("admin", "pw"), ("root", "pa:ss"))  # split at the first colon
    assert settings.allow_models == ("opt-125m", "opt-350m")
    assert settings.offload_base == "/tmp"
    assert settings.max_new_tokens_cap == 128
    assert settings.max_message_chars == 1000
    assert settings.max_history_turns == 5
    assert settings.queue_size == 8
    assert settings.public and not settings.on_space


def test_settings_from_environment() -> None:
    env = {
        "OPTDEMO_MODEL": "opt-125m",
        "OPTDEMO_MAX_MEMORY": "cpu=4GiB",
        "OPTDEMO_OFFLOAD_FOLDER": "/tmp/o",
        "OPTDEMO_DTYPE": "bfloat16",
        "OPTDEMO_PRELOAD": "true",
        "OPTDEMO_HOST": "0.0.0.0",
        "OPTDEMO_PORT": "8123",
        "OPTDEMO_AUTH": "admin:pw, ops:secret",
        "OPTDEMO_LOCK_CONFIG": "1",
        "OPTDEMO_ALLOW_MODEL": "opt-125m,opt-350m",
        "OPTDEMO_MAX_NEW_TOKENS_CAP": "32",
    }
    settings = parse_settings([], env=env)
    assert settings.model == "opt-125m"
    assert settings.max_memory == "cpu=4GiB"
    assert settings.offload_folder == "/tmp/o"
    assert settings.dtype == "bfloat16"
    assert settings.preload is True
    assert settings.host == "0.0.0.0" and settings.port == 8123
    assert settings.auth == (("admin", "pw"), ("ops", "secret"))
    assert settings.lock_config is True and settings.public is True
    assert settings.allow_models == ("opt-125m", "opt-350m")
    assert settings.max_new_tokens_cap == 32
    for off in ("0", "false", "no", ""):
        assert parse_settings([], env={"OPTDEMO_SHARE": off}).share is False
    assert parse_settings([], env={"OPTDEMO_SHARE": "yes"}).share is True


def test_flags_win_over_environment() -> None:
    env = {
        "OPTDEMO_MODEL": "opt-125m",
        "OPTDEMO_MAX_MEMORY": "cpu=4GiB",
        "OPTDEMO_DTYPE": "bfloat16",
        "OPTDEMO_PORT": "8123",
        "OPTDEMO_AUTH": "env:user",
        "OPTDEMO_ALLOW_MODEL": "opt-350m",
    }
    settings = parse_settings(
        [
            "--model",
            "opt-2.7b",
            "--max-memory",
            "cpu=8GiB",
            "--dtype",
            "float32",
            "--port",
            "9000",
            "--auth",
            "flag:user",
            "--allow-model",
            "opt-1.3b",
        ],
        env=env,
    )
    assert settings.model == "opt-2.7b"
    assert settings.max_memory == "cpu=8GiB"
    assert settings.dtype == "float32"
    assert settings.port == 9000
    assert settings.auth == (("flag", "user"),)
    assert settings.allow_models == ("opt-1.3b",)


@pytest.mark.parametrize("entry", ["noColon", ":pw", "admin:", ":"])
def test_bad_auth_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="USER:PASS"):
        parse_settings(["--auth", entry], env={})
    with pytest.raises(ConfigError, match="USER:PASS"):
        parse_settings([], env={"OPTDEMO_AUTH": entry})


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"OPTDEMO_PORT": "http"}, "OPTDEMO_PORT must be a whole number"),
        ({"OPTDEMO_MAX_NEW_TOKENS_CAP": "0"}, "must be positive"),
        ({"OPTDEMO_QUEUE_SIZE": "-3"}, "must be positive"),
        ({"OPTDEMO_DTYPE": "float8"}, "dtype 'float8' is not supported"),
    ],
)
def test_bad_environment_values_are_config_errors(env: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_settings([], env=env)


def test_bad_flag_values_exit_like_argparse() -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--dtype", "float8"], env={})
    with pytest.raises(SystemExit):
        parse_settings(["--port", "http"], env={})


def test_space_turns_on_public_mode_and_preload() -> None:
    settings = parse_settings([], env={"SPACE_ID": "someone/optdemo"})
    assert settings.on_space and settings.lock_config and settings.preload
    assert settings.public
    assert not parse_settings([], env={"SPACE_ID": ""}).public


@pytest.mark.parametrize(
    ("kwargs", "public"),
    [
        ({}, False),
        ({"share": True}, True),
        ({"lock_config": True}, True),
        ({"on_space": True}, True),
        ({"auth": (("a", "b"),)}, False),  # accounts alone do not lock anything
        ({"host": "0.0.0.0"}, False),
    ],
)
def test_public_property(kwargs: dict, public: bool) -> None:
    assert AppSettings(**kwargs).public is public
