"""Command-line flags and environment variables: how the app is started.

Every flag has an environment variable (``--max-memory`` <-> ``OPTDEMO_MAX_MEMORY``) so that a
Hugging Face Space, which cannot pass flags, is configured through its variables. A flag given on
the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from optdemo.catalog import TINY_MODEL_ID
from optdemo.config import DTYPES
from optdemo.defaults import (
    DEFAULT_MAX_HISTORY_TURNS,
    DEFAULT_MAX_MESSAGE_CHARS,
    DEFAULT_MAX_NEW_TOKENS_CAP,
    DEFAULT_QUEUE_SIZE,
)
from optdemo.errors import ConfigError


@dataclass(frozen=True)
class AppSettings:
    """How this server runs: the initial configuration, the network, and the public-mode rules."""

    model: str = TINY_MODEL_ID  # configuration shown (and preloaded) at start
    max_memory: str | None = None  # max_memory spec; None: suggested from this machine
    offload_folder: str | None = None
    dtype: str = "auto"
    preload: bool = False  # load the model before serving the first request
    host: str = "127.0.0.1"
    port: int | None = None  # None: Gradio picks 7860 or the next free port
    share: bool = False  # Gradio public share link
    auth: tuple[tuple[str, str], ...] = ()  # admin accounts; they may change the configuration
    lock_config: bool = False  # visitors cannot change the configuration or unload
    allow_models: tuple[str, ...] = ()  # models a visitor may plan; default: the configured one
    offload_base: str | None = None  # offload folders must lie under this directory
    max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP
    max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS
    max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS
    queue_size: int = DEFAULT_QUEUE_SIZE
    on_space: bool = field(default=False)  # running on a Hugging Face Space

    @property
    def public(self) -> bool:
        """Strangers can reach the app: a share link, a Space, or an explicit lock."""
        return self.share or self.lock_config or self.on_space

    @property
    def confined_offload_base(self) -> str | None:
        """The directory offload folders must lie under: ``--offload-base``, or in public mode the
        Space's persistent storage (``/data/offload``) or ``./offload``; None means anywhere."""
        if self.offload_base:
            return os.path.abspath(self.offload_base)
        if not self.public:
            return None
        return os.path.join(space_storage() or os.path.abspath("."), "offload")


def space_storage() -> str | None:
    """The Space's persistent storage mount (``/data``) when it exists and is writable."""
    return "/data" if os.path.isdir("/data") and os.access("/data", os.W_OK) else None


def _space_offload_folder(on_space: bool) -> str | None:
    """On a Space, offload to persistent storage when there is some, else next to the app."""
    if not on_space:
        return None
    return os.path.join(space_storage() or os.path.abspath("."), "offload")


def _flag_env(name: str) -> str:
    return "OPTDEMO_" + name.upper().replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    """The ``app.py`` command line; every flag also reads ``OPTDEMO_<FLAG>`` from the environment."""
    parser = argparse.ArgumentParser(
        prog="app.py",
        description=(
            "optdemo: plan, load and chat with models larger than your GPU, spread over GPU, CPU "
            "RAM and disk. Every flag can also be set with an environment variable, shown in "
            "brackets (useful on Hugging Face Spaces)."
        ),
    )

    def add(flag: str, help_text: str, **kwargs: object) -> None:
        parser.add_argument(f"--{flag}", help=f"{help_text} [{_flag_env(flag)}]", **kwargs)

    add("model", f"model to configure at start: OPT size, Hub id or folder (default {TINY_MODEL_ID})")
    add("max-memory", "memory budget, e.g. '0=5GiB,cpu=20GiB' (default: suggested for this machine)")
    add("offload-folder", "folder for layers that go to disk")
    add("dtype", "weight dtype (default auto)", choices=DTYPES)
    add("preload", "load the model before serving", action="store_true", default=None)
    add("host", "address to bind (default 127.0.0.1; 0.0.0.0 exposes it to your network)")
    add("port", "port to serve on (default: 7860 or the next free one)", type=int)
    add(
        "share", "create a public Gradio share link (turns on public mode)", action="store_true", default=None
    )
    add(
        "auth",
        "admin account USER:PASS; repeatable. Admins may change the configuration in public mode",
        action="append",
        metavar="USER:PASS",
    )
    add(
        "lock-config",
        "visitors cannot change the configuration (public mode)",
        action="store_true",
        default=None,
    )
    add("allow-model", "model visitors may plan in public mode; repeatable", action="append", metavar="MODEL")
    add("offload-base", "offload folders must lie under this directory")
    add(
        "max-new-tokens-cap",
        f"most tokens one reply may ask for (default {DEFAULT_MAX_NEW_TOKENS_CAP})",
        type=int,
    )
    add(
        "max-message-chars",
        f"longest message or prompt accepted (default {DEFAULT_MAX_MESSAGE_CHARS})",
        type=int,
    )
    add("max-history-turns", f"chat turns kept per session (default {DEFAULT_MAX_HISTORY_TURNS})", type=int)
    add(
        "queue-size",
        f"requests waiting at most before new ones are refused (default {DEFAULT_QUEUE_SIZE})",
        type=int,
    )
    return parser


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> AppSettings:
    """Settings from command-line flags, falling back to ``OPTDEMO_*`` environment variables.

    Raises:
        ConfigError: a malformed value (bad --auth, non-numeric env number, bad dtype).
    """
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)

    def pick(flag: str, default: object = None) -> object:
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            return value
        return env.get(_flag_env(flag), default)

    def number(flag: str, default: int) -> int:
        value = pick(flag, default)
        try:
            number = int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"{_flag_env(flag)} must be a whole number, got {value!r}") from None
        if number <= 0:
            raise ConfigError(f"--{flag} must be positive, got {number}")
        return number

    def flag_on(flag: str) -> bool:
        value = pick(flag, False)
        return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")

    def listed(flag: str, env_name: str) -> list[str]:
        values = getattr(args, flag.replace("-", "_")) or []
        if not values and env.get(env_name):
            values = [v for v in env[env_name].split(",") if v.strip()]
        return [v.strip() for v in values]

    dtype = str(pick("dtype", "auto"))
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
    auth = []
    for entry in listed("auth", "OPTDEMO_AUTH"):
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ConfigError("--auth takes USER:PASS, e.g. --auth admin:s3cret")
        auth.append((user, password))
    port = pick("port")
    on_space = bool(env.get("SPACE_ID"))
    return AppSettings(
        model=str(pick("model", TINY_MODEL_ID)),
        max_memory=pick("max-memory") or None,  # type: ignore[arg-type]
        offload_folder=pick("offload-folder") or _space_offload_folder(on_space),  # type: ignore[arg-type]
        dtype=dtype,
        preload=flag_on("preload") or on_space,
        host=str(pick("host", "127.0.0.1")),
        port=number("port", 7860) if port is not None else None,
        share=flag_on("share"),
        auth=tuple(auth),
        lock_config=flag_on("lock-config") or on_space,
        allow_models=tuple(listed("allow-model", "OPTDEMO_ALLOW_MODEL")),
        offload_base=pick("offload-base") or None,  # type: ignore[arg-type]
        max_new_tokens_cap=number("max-new-tokens-cap", DEFAULT_MAX_NEW_TOKENS_CAP),
        max_message_chars=number("max-message-chars", DEFAULT_MAX_MESSAGE_CHARS),
        max_history_turns=number("max-history-turns", DEFAULT_MAX_HISTORY_TURNS),
        queue_size=number("queue-size", DEFAULT_QUEUE_SIZE),
        on_space=on_space,
    )
