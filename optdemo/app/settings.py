"""Command-line flags and environment variables: how the app is started.

Every flag has an environment variable (``--max-memory`` <-> ``OPTDEMO_MAX_MEMORY``) so that a
Hugging Face Space, which cannot pass flags, is configured through its variables. A flag given on
the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from optdemo.core.budget import parse_max_memory
from optdemo.core.catalog import TINY_MODEL_ID
from optdemo.core.defaults import (
    CPU_LAYER_POLICIES,
    DEFAULT_CPU_LAYERS,
    DEFAULT_DISK_TIER,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_HISTORY_CHARS,
    DEFAULT_MAX_HISTORY_TURNS,
    DEFAULT_MAX_MESSAGE_CHARS,
    DEFAULT_MAX_NEW_TOKENS_CAP,
    DEFAULT_QUEUE_SIZE,
    DISK_TIER_MODES,
)
from optdemo.core.errors import ConfigError, OptdemoError
from optdemo.core.load_config import DRAFT_COPIES, DTYPES, QUANTIZATIONS, normalize_draft, normalize_model
from optdemo.remote.client import parse_endpoint

MAX_PORT = 65535


@dataclass(frozen=True)
class AppSettings:
    """How this server runs: the initial configuration, the network, and the public-mode rules."""

    model: str = TINY_MODEL_ID  # configuration shown (and preloaded) at start
    max_memory: str | None = None  # max_memory spec; None: suggested from this machine
    offload_folder: str | None = None
    dtype: str = "auto"
    cpu_layers: str = DEFAULT_CPU_LAYERS  # with a GPU: where offloaded layers run
    fast_offload: bool = True  # False: plain Accelerate everywhere
    disk_tier: str = DEFAULT_DISK_TIER  # CPU-executed models: map, stream, or auto
    quantization: str = "none"  # 8bit / 4bit: bitsandbytes on a GPU, optdemo.weights.quantize on the CPU
    draft: str = "none"  # speculative decoding's draft: none, 8bit / 4bit (the model's copy), a model
    preload: bool = False  # load the model before serving the first request
    host: str = "127.0.0.1"
    port: int | None = None  # None: Gradio picks 7860 or the next free port
    share: bool = False  # Gradio public share link
    auth: tuple[tuple[str, str], ...] = ()  # admin accounts; they may change the configuration
    lock_config: bool = False  # visitors cannot change the configuration or unload
    allow_models: tuple[str, ...] = ()  # models a visitor may plan; default: the configured one
    # Models a signed-in admin may plan and load in public mode; default: the visitors' models,
    # the catalog's OPT sizes and tiny-opt (never an arbitrary local folder unless listed).
    admin_allow_models: tuple[str, ...] = ()
    offload_base: str | None = None  # offload folders must lie under this directory
    max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP
    max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS
    max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS
    max_history_chars: int = DEFAULT_MAX_HISTORY_CHARS  # characters in a conversation's earlier turns
    queue_size: int = DEFAULT_QUEUE_SIZE
    max_batch: int = DEFAULT_MAX_BATCH  # replies decoded together; more wait in line
    prefix_cache: bool = True  # keep prompts' caches for the next prompts that start with them
    api_key: str | None = field(default=None, repr=False)  # bearer token the /v1 API requires
    openai_api: bool = False  # serve the /v1 API in public mode too (it is always on otherwise)
    mcp: bool = False  # serve the MCP tools (Gradio's MCP server) at /gradio_api/mcp/
    # A serving endpoint (TGI, vLLM, transformers serve) to chat through instead of a local model;
    # in public mode, the only one an admin may connect to.
    backend_url: str | None = None
    backend_model: str | None = None  # the model name its requests carry; None: the one it lists
    backend_token: str | None = field(default=None, repr=False)  # its bearer token; never shown
    on_space: bool = field(default=False)  # running on a Hugging Face Space

    @property
    def public(self) -> bool:
        """Strangers can reach the app: a share link, a Space, or an explicit lock."""
        return self.share or self.lock_config or self.on_space

    @property
    def openai_api_enabled(self) -> bool:
        """Whether the OpenAI-compatible API answers: always, except in public mode where only the
        operator turns it on (``--openai-api``)."""
        return self.openai_api or not self.public

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


# Values of an on/off variable that mean "on" (anything else, or no variable, means off).
_TRUE_WORDS = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Flag:
    """One command-line flag and its environment variable (``--max-memory`` <-> ``OPTDEMO_MAX_MEMORY``)."""

    name: str  # without the leading "--"
    help: str
    # "text"; "int" (a positive whole number); "bool" (a switch; the variable is on for 1/true/yes/on);
    # "list" (repeatable; the variable holds a comma-separated list).
    kind: str = "text"
    default: object = None  # when neither the flag nor its variable is given
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def env(self) -> str:
        """The environment variable that sets this flag's default."""
        return "OPTDEMO_" + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value in."""
        return self.name.replace("-", "_")


# The one table of flags: app.py's command line and the environment both come from it.
FLAGS = (
    Flag(
        "model",
        f"model to configure at start: OPT size, Hub id or folder (default {TINY_MODEL_ID})",
        default=TINY_MODEL_ID,
    ),
    Flag("max-memory", "memory budget, e.g. '0=5GiB,cpu=20GiB' (default: suggested for this machine)"),
    Flag("offload-folder", "folder for layers that go to disk"),
    Flag("dtype", "weight dtype (default auto)", default="auto", choices=DTYPES),
    Flag(
        "cpu-layers",
        f"with a GPU, where offloaded layers run (default {DEFAULT_CPU_LAYERS}: the faster by prediction)",
        default=DEFAULT_CPU_LAYERS,
        choices=CPU_LAYER_POLICIES,
    ),
    Flag(
        "disk-tier",
        f"on a CPU-executed model, how disk layers are served (default {DEFAULT_DISK_TIER}: mapped where "
        "the memory available can cache them, streamed past the page cache where it cannot)",
        default=DEFAULT_DISK_TIER,
        choices=DISK_TIER_MODES,
    ),
    Flag(
        "quantization",
        "8-bit / 4-bit weights (default none): bitsandbytes on a GPU; on a CPU-only machine torch's "
        "int8 / int4 kernels, quantized once into the cache, disk tier included",
        default="none",
        choices=QUANTIZATIONS,
    ),
    Flag(
        "draft",
        "speculative decoding (default none): the model's own 8bit / 4bit copy, kept in RAM, proposes "
        "tokens that the model verifies several at a time; the reply is the model's own",
        default="none",
        choices=("none", *DRAFT_COPIES),
    ),
    Flag("draft-model", "speculative decoding with this smaller model sharing the tokenizer as the draft"),
    Flag(
        "plain-accelerate", "turn fast offloading off: load and run exactly as plain Accelerate", kind="bool"
    ),
    Flag("preload", "load the model before serving", kind="bool"),
    Flag(
        "host", "address to bind (default 127.0.0.1; 0.0.0.0 exposes it to your network)", default="127.0.0.1"
    ),
    Flag("port", "port to serve on (default: 7860 or the next free one)", kind="int"),
    Flag("share", "create a public Gradio share link (turns on public mode)", kind="bool"),
    Flag(
        "auth",
        "admin account USER:PASS; repeatable. Admins may change the configuration in public mode",
        kind="list",
        metavar="USER:PASS",
    ),
    Flag("lock-config", "visitors cannot change the configuration (public mode)", kind="bool"),
    Flag("allow-model", "model visitors may plan in public mode; repeatable", kind="list", metavar="MODEL"),
    Flag(
        "admin-allow-model",
        "model signed-in admins may plan and load in public mode; repeatable (default: the visitors' "
        "models, the OPT sizes and tiny-opt)",
        kind="list",
        metavar="MODEL",
    ),
    Flag("offload-base", "offload folders must lie under this directory"),
    Flag(
        "max-new-tokens-cap",
        f"most tokens one reply may ask for (default {DEFAULT_MAX_NEW_TOKENS_CAP})",
        kind="int",
        default=DEFAULT_MAX_NEW_TOKENS_CAP,
    ),
    Flag(
        "max-message-chars",
        f"longest message or prompt accepted (default {DEFAULT_MAX_MESSAGE_CHARS})",
        kind="int",
        default=DEFAULT_MAX_MESSAGE_CHARS,
    ),
    Flag(
        "max-history-turns",
        f"chat turns kept per session (default {DEFAULT_MAX_HISTORY_TURNS})",
        kind="int",
        default=DEFAULT_MAX_HISTORY_TURNS,
    ),
    Flag(
        "max-history-chars",
        "most characters in a conversation's earlier turns, all together (default "
        f"{DEFAULT_MAX_HISTORY_CHARS})",
        kind="int",
        default=DEFAULT_MAX_HISTORY_CHARS,
    ),
    Flag(
        "queue-size",
        f"requests waiting at most before new ones are refused (default {DEFAULT_QUEUE_SIZE})",
        kind="int",
        default=DEFAULT_QUEUE_SIZE,
    ),
    Flag(
        "max-batch",
        f"replies decoded together, sharing each pass over the weights; more wait in line; the KV "
        f"cache room the memory budget leaves may lower it (default {DEFAULT_MAX_BATCH})",
        kind="int",
        default=DEFAULT_MAX_BATCH,
    ),
    Flag(
        "no-prefix-cache",
        "keep no prompt caches between requests: every prompt is computed whole (replies are the same)",
        kind="bool",
    ),
    Flag("api-key", "bearer token the OpenAI-compatible API (/v1) requires (default: none)", metavar="KEY"),
    Flag("openai-api", "serve the OpenAI-compatible API (/v1) in public mode too", kind="bool"),
    Flag("mcp", "serve plan, status, generate and chat as MCP tools at /gradio_api/mcp/", kind="bool"),
    Flag(
        "backend-url",
        "chat through this serving endpoint (TGI, vLLM, transformers serve; OpenAI-compatible) instead "
        "of a model on this machine, e.g. http://127.0.0.1:8000",
        metavar="URL",
    ),
    Flag("backend-model", "the model name the serving endpoint serves (default: the one it lists)"),
    Flag("backend-token", "bearer token for the serving endpoint (never shown)", metavar="TOKEN"),
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a malformed flag as app.py reports every bad value: one line that says
    what is wrong, exit status 2 (argparse itself prints its whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"optdemo: {message}\n")


class _Repeatable(argparse.Action):
    """``action="append"``, except that values given on the command line replace the default list
    (which came from the environment) instead of adding to it: a flag wins over its variable."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        previous = [] if current is self.default else current  # first use: drop the environment's list
        setattr(namespace, self.dest, [*previous, values])


def _env_default(flag: Flag, env: Mapping[str, str]) -> object:
    """The flag's default: its environment variable, parsed and checked, else the table's default.

    Raises:
        ConfigError: the variable holds something the flag would not accept.
    """
    raw = env.get(flag.env)
    if flag.kind == "bool":
        return raw is not None and raw.strip().lower() in _TRUE_WORDS
    if flag.kind == "list":
        return [v for v in (raw or "").split(",") if v.strip()]
    if raw is None:
        return flag.default
    if flag.kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{flag.env} must be a whole number, got {raw!r}") from None
    if flag.choices and raw not in flag.choices:
        raise ConfigError(f"{flag.name} {raw!r} is not supported: choose one of {', '.join(flag.choices)}")
    return raw


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The ``app.py`` command line; each flag's default comes from its ``OPTDEMO_<FLAG>`` variable.

    Raises:
        ConfigError: an environment variable holds a malformed value.
    """
    env = os.environ if env is None else env
    parser = _Parser(
        prog="app.py",
        description=(
            "optdemo: plan, load and chat with models larger than your GPU, spread over GPU, CPU "
            "RAM and disk. Every flag can also be set with an environment variable, shown in "
            "brackets (useful on Hugging Face Spaces)."
        ),
    )
    actions: dict[str, dict[str, object]] = {
        "text": {},
        "int": {"type": int},
        "bool": {"action": "store_true"},
        "list": {"action": _Repeatable},
    }
    for flag in FLAGS:
        extra = {k: v for k, v in (("choices", flag.choices), ("metavar", flag.metavar)) if v is not None}
        parser.add_argument(
            f"--{flag.name}",
            help=f"{flag.help} [{flag.env}]",
            default=_env_default(flag, env),
            **actions[flag.kind],
            **extra,
        )
    return parser


def _check_values(args: argparse.Namespace) -> None:
    """Check what can be checked at start without a network, so that a bad value is one line at
    start rather than a traceback when the app builds its page.

    Raises:
        ConfigError: naming the flag and what is wrong with its value.
    """
    checks: list[tuple[str, object, Callable[[str], object]]] = [
        ("--model", args.model, normalize_model),
        ("--max-memory", args.max_memory, parse_max_memory),
    ]
    checks += [("--draft-model", args.draft_model, normalize_draft)]
    checks += [("--allow-model", name, normalize_model) for name in args.allow_model]
    checks += [("--admin-allow-model", name, normalize_model) for name in args.admin_allow_model]
    for flag, value, check in checks:
        if not value:
            continue
        try:
            check(str(value))
        except OptdemoError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    if args.backend_url:
        try:
            parse_endpoint(args.backend_url, args.backend_model, args.backend_token)
        except OptdemoError as exc:
            raise ConfigError(f"--backend-url: {exc}") from None
    elif args.backend_model or args.backend_token:
        raise ConfigError("--backend-model and --backend-token need --backend-url")
    if args.draft_model and args.draft != "none":
        raise ConfigError("--draft and --draft-model both set the draft: give one of them")
    if args.offload_folder and os.path.exists(args.offload_folder) and not os.path.isdir(args.offload_folder):
        raise ConfigError(f"--offload-folder: {args.offload_folder} is a file, not a folder")


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> AppSettings:
    """Settings from command-line flags, falling back to ``OPTDEMO_*`` environment variables.

    Raises:
        ConfigError: a malformed value (bad --auth, non-numeric env number, bad dtype).
    """
    env = os.environ if env is None else env
    args = build_parser(env).parse_args(argv)
    for flag in FLAGS:
        value = getattr(args, flag.dest)
        if flag.kind == "int" and value is not None and value <= 0:
            raise ConfigError(f"--{flag.name} must be positive, got {value}")
    if args.port is not None and args.port > MAX_PORT:
        raise ConfigError(f"--port must be between 1 and {MAX_PORT}, got {args.port}")
    _check_values(args)
    auth = []
    for entry in args.auth:
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise ConfigError("--auth takes USER:PASS, e.g. --auth admin:s3cret")
        auth.append((user, password))
    on_space = bool(env.get("SPACE_ID"))
    return AppSettings(
        model=args.model,
        max_memory=args.max_memory or None,
        offload_folder=args.offload_folder or _space_offload_folder(on_space),
        dtype=args.dtype,
        cpu_layers=args.cpu_layers,
        fast_offload=not args.plain_accelerate,
        disk_tier=args.disk_tier,
        quantization=args.quantization,
        draft=args.draft_model or args.draft,
        # Public mode starts with a loaded model: visitors cannot load one, so without it nobody could.
        preload=args.preload or on_space or args.share or args.lock_config,
        host=args.host,
        port=args.port,
        share=args.share,
        auth=tuple(auth),
        lock_config=args.lock_config or on_space,
        allow_models=tuple(v.strip() for v in args.allow_model),
        admin_allow_models=tuple(v.strip() for v in args.admin_allow_model),
        offload_base=args.offload_base or None,
        max_new_tokens_cap=args.max_new_tokens_cap,
        max_message_chars=args.max_message_chars,
        max_history_turns=args.max_history_turns,
        max_history_chars=args.max_history_chars,
        queue_size=args.queue_size,
        max_batch=args.max_batch,
        prefix_cache=not args.no_prefix_cache,
        api_key=args.api_key or None,
        openai_api=args.openai_api,
        mcp=args.mcp,
        backend_url=args.backend_url or None,
        backend_model=args.backend_model or None,
        backend_token=args.backend_token or None,
        on_space=on_space,
    )
