"""The app's operations as plain Python: what the UI callbacks and the named API endpoints call.

:class:`DemoService` is a thin facade: it turns raw inputs (text from a form or an API call) into
engine requests and returns dataclasses, delegating each other job to one part: the deployment's
access rules to :class:`~optdemo.app.access.AccessPolicy`, per-session state (stop events, API chat
histories) to :class:`~optdemo.app.sessions.SessionStore`, the model to
:class:`~optdemo.runtime.manager.ModelManager`, or, when one is connected, to a serving endpoint
(:class:`~optdemo.remote.endpoint_backend.EndpointBackend`): chat and completion go to the active
:class:`~optdemo.core.backend.Backend` with the same caps, validation and stop handling. It never
imports gradio: the UI adapts its results to components and its exceptions to ``gr.Error``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from optdemo.app.access import AccessPolicy
from optdemo.app.admin_sessions import AdminGrant
from optdemo.app.admission import Admission
from optdemo.app.backend_choice import BackendChoice
from optdemo.app.machine import conversion_cache_summary
from optdemo.app.prompt_room import PromptCounter
from optdemo.app.sessions import SessionStore
from optdemo.app.settings import AppSettings
from optdemo.app.status import BackendStatus
from optdemo.core import defaults
from optdemo.core.backend import Backend
from optdemo.core.budget import format_bytes, parse_max_memory
from optdemo.core.catalog import OPT_SIZES, TINY_MODEL_ID, catalog_entry
from optdemo.core.chat_prompt import ChatTurn, checked_history
from optdemo.core.errors import (
    ConfigError,
    GenerationError,
    NoModelError,
    NoModelForVisitorsError,
    OptdemoError,
)
from optdemo.core.generation import CacheScope, GenerationParams, GenerationStats, GenerationUpdate
from optdemo.core.load_config import LoadConfig
from optdemo.plan.planner import Plan
from optdemo.plan.speed import SpeedPrediction, predict_plan
from optdemo.remote.endpoint_backend import EndpointBackend
from optdemo.runtime.batching.request import Serving
from optdemo.runtime.manager import ModelManager
from optdemo.runtime.status import LoadReport
from optdemo.system.hardware import probe_hardware, suggest_budget


@dataclass(frozen=True)
class PlanView:
    """A plan with the speed it is predicted to run at on this machine."""

    __hash__ = None  # type: ignore[assignment]  # holds dicts; compared by value, never hashed

    plan: Plan
    prediction: SpeedPrediction
    config: LoadConfig | None = None  # the configuration planned, when known (the form's)

    def to_dict(self) -> dict:
        """The ``/plan`` JSON: the plan's fields and a ``prediction``."""
        return {**self.plan.to_dict(), "prediction": self.prediction.to_dict()}


@dataclass(frozen=True)
class PlanNotice:
    """What a session's plan state holds while no plan stands for the form: a plan being computed,
    or one that could not be made. It names the model, so the previous plan never looks current."""

    model: str  # the model's display name
    message: str  # Markdown, e.g. "Planning **opt-2.7b**…"


@dataclass(frozen=True)
class ChatReply:
    """One streamed step of a reply: the text so far, and the stats on the last step. While the
    reply waits for a place in the batch, ``status`` says so (and ``text`` is empty)."""

    text: str
    stats: GenerationStats | None = None
    status: str = ""


def naming_model(exc: OptdemoError, config: LoadConfig) -> OptdemoError:
    """``exc`` itself when its message names ``config``'s model, else the same error saying which
    model it is about."""
    message = str(exc)
    if config.display_name in message or config.model in message:
        return exc
    return type(exc)(f"loading {config.display_name}: {message}")


class DemoService:
    """Everything the app can do, with the deployment's rules applied; one per server."""

    def __init__(self, manager: ModelManager, settings: AppSettings) -> None:
        self.manager = manager
        self.settings = settings
        self.access = AccessPolicy(settings)
        self.sessions = SessionStore(settings.max_history_turns)
        # Every reply, from any route, holds one of these places until it ends.
        self.admission = Admission(settings.queue_size, settings.max_batch)
        # The local model, or the serving endpoint connected in its place.
        self.backends = BackendChoice(manager, settings, self.access, self.sessions)
        self.prompts = PromptCounter()  # the loaded model's prompt tokens, for max_new_tokens' limit

    @classmethod
    def for_settings(cls, settings: AppSettings, manager: ModelManager | None = None) -> DemoService:
        """The service of a server started with ``settings``, with its one model manager (built
        here unless given: tests pass their own)."""
        if manager is None:
            manager = ModelManager(max_batch=settings.max_batch, reuse_prompts=settings.prefix_cache)
        return cls(manager, settings)

    @property
    def backend(self) -> Backend:
        """Where chat and completion go now: the connected endpoint, else the local model."""
        return self.backends.active

    @property
    def endpoint(self) -> EndpointBackend | None:
        """The serving endpoint answering instead of the local model, or None."""
        return self.backends.endpoint

    # ---------------------------------------------------------------- access
    # ``admin`` below is the caller's admin credential (the token a sign-in issued, or None),
    # never a session id: a session hash is chosen by the client and seen by others.
    def is_admin(self, admin: str | None) -> bool:
        """Whether the holder of ``admin`` may change the configuration (always, outside public
        mode)."""
        return self.access.is_admin(admin)

    def sign_in(self, client: str, username: object, password: object) -> AdminGrant:
        """A new admin credential for an ``--auth`` account; ``client`` is the caller's address,
        whose failed attempts make it wait (:meth:`AccessPolicy.sign_in`)."""
        return self.access.sign_in(client, username, password)

    def sign_out(self, admin: str | None) -> bool:
        """End the admin credential ``admin``; True if it was live."""
        return self.access.sign_out(admin)

    # ---------------------------------------------------------------- configuration
    def initial_config(self) -> LoadConfig:
        """The configuration given at start (flags / environment), with a suggested budget."""
        budget = self.settings.max_memory or str(suggest_budget(probe_hardware(self.settings.offload_folder)))
        return LoadConfig(
            model=self.settings.model,
            dtype=self.settings.dtype,
            max_memory=parse_max_memory(budget),
            offload_folder=self.settings.offload_folder,
            fast_offload=self.settings.fast_offload,
            cpu_layers=self.settings.cpu_layers,
            disk_tier=self.settings.disk_tier,
            quantization=self.settings.quantization,
            draft=self.settings.draft,
        )

    def model_choices(self, admin: str | None = None) -> list[tuple[str, str]]:
        """(label, value) pairs for the model picker: the tiny model and the eight OPT sizes (in
        public mode, those the caller may use)."""
        choices = [("tiny-opt (built-in, 0.3M params, works offline)", TINY_MODEL_ID)]
        for name in OPT_SIZES:
            entry = catalog_entry(name)
            assert entry is not None
            choices.append(
                (
                    f"{name} ({entry.parameters / 1e9:.2g}B params, {format_bytes(entry.checkpoint_bytes)})",
                    entry.repo_id,
                )
            )
        if self.settings.public:
            allowed = set(self.access.allowed_models(admin))
            choices = [c for c in choices if c[1] in allowed]
        return choices

    def make_config(
        self,
        model: str,
        max_memory: str | None = None,
        dtype: str = "auto",
        offload_folder: str | None = None,
        revision: str | None = None,
        quantization: str = "none",
        tokenizer: str | None = None,
        fast_offload: bool = True,
        cpu_layers: str = defaults.DEFAULT_CPU_LAYERS,
        admin: str | None = None,
        disk_tier: str = defaults.DEFAULT_DISK_TIER,
        draft: str = "none",
    ) -> LoadConfig:
        """Build a :class:`LoadConfig` from form or API values, applying public-mode rules for the
        caller (holders of an admin credential may name more models than visitors).

        Raises:
            ConfigError / BudgetError: a value is invalid or not allowed here.
        """
        for name, value in (
            ("model", model),
            ("max_memory", max_memory),
            ("dtype", dtype),
            ("offload_folder", offload_folder),
            ("revision", revision),
            ("quantization", quantization),
            ("tokenizer", tokenizer),
            ("cpu_layers", cpu_layers),
            ("disk_tier", disk_tier),
            ("draft", draft),
        ):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be text, not {type(value).__name__}")
        config = LoadConfig(
            model=model or "",
            revision=revision or None,
            dtype=dtype or "auto",
            max_memory=parse_max_memory(max_memory) if max_memory and max_memory.strip() else None,
            offload_folder=self.access.confine_offload(offload_folder),
            quantization=quantization or "none",
            tokenizer=tokenizer or None,
            fast_offload=fast_offload,
            cpu_layers=cpu_layers or defaults.DEFAULT_CPU_LAYERS,
            disk_tier=disk_tier or defaults.DEFAULT_DISK_TIER,
            draft=draft or "none",
        )
        self.access.check_config(config, admin)
        return config

    # ---------------------------------------------------------------- plan / load
    def plan(self, config: LoadConfig) -> PlanView:
        """The plan for ``config`` (never touches weights), with its predicted speed here."""
        return self.view(self.manager.plan(config), config.offload_folder, config)

    def view(self, plan: Plan, folder: str | None = None, config: LoadConfig | None = None) -> PlanView:
        """``plan`` (of ``config``) with its predicted speed here (RAM free now decides the page cache)."""
        return PlanView(plan, predict_plan(plan, probe_hardware(folder).ram_available_bytes), config)

    def status(self) -> BackendStatus:
        """What is loaded now (or which endpoint serves), and whether a load or a reply is running."""
        return self.backends.status()

    def loaded_prediction(self) -> SpeedPrediction | None:
        """The predicted speed of the loaded model, or None when nothing is loaded (or an endpoint
        serves: its speed is the engine's)."""
        plan = self.manager.status().plan
        if plan is None or self.endpoint is not None:
            return None
        return predict_plan(plan, probe_hardware().ram_available_bytes)

    def load(
        self, config: LoadConfig, admin: str | None = None, progress: Callable | None = None
    ) -> LoadReport:
        """Load ``config`` (admins only in public mode); reuses when unchanged. Every error names
        the model it is about, so that the failure of an earlier request (a slow one, for another
        model) is never read as being about the model selected now."""
        try:
            current = self.manager.current_config
            if current is None or current != config or self.endpoint is not None:
                self.access.require_admin(admin, "load or change the model")
            report = self.manager.load(config, progress)
        except OptdemoError as exc:
            raise naming_model(exc, config) from None
        self.backends.use_local()  # this machine answers again
        return report

    def preload(self) -> str:
        """Get ready before serving, as the operator said at start (so no access check): connect
        to ``--backend-url`` when given, else load the configured model. Returns what was done."""
        operator = self.backends.operator_endpoint()
        if operator is not None:
            return self.backends.connect_operator(operator).describe()
        return self.manager.load(self.initial_config()).message

    def unload(self, admin: str | None = None) -> bool:
        """Unload the model, or disconnect the serving endpoint (admins only in public mode)."""
        if self.endpoint is not None:
            return self.backends.disconnect(admin)
        self.access.require_admin(admin, "unload the model")
        return self.manager.unload()

    def conversion_cache(self) -> str:
        """One line on the .bin -> safetensors conversion cache: how many checkpoints, how big
        (the line ``python -m optdemo cache`` ends with)."""
        return conversion_cache_summary()

    def clear_conversion_cache(self, admin: str | None = None) -> int:
        """Delete the converted checkpoints (admins only in public mode); returns bytes freed."""
        from optdemo.weights import convert

        self.access.require_admin(admin, "clear the conversion cache")
        return convert.clear_cache(in_use=self.manager.status().checkpoint or None)

    # ---------------------------------------------------------------- generation
    def params(
        self,
        max_new_tokens: object = defaults.MAX_NEW_TOKENS,
        temperature: object = defaults.TEMPERATURE,
        top_p: object = defaults.TOP_P,
        top_k: object = defaults.TOP_K,
        repetition_penalty: object = defaults.REPETITION_PENALTY,
        seed: object = None,
        stop: object = (),
    ) -> GenerationParams:
        """Validated generation parameters (``seed`` "" or -1: random; ``stop``: a list of texts
        or one per line). The upper bound of max_new_tokens depends on the model and the prompt:
        :meth:`chat` and :meth:`complete` apply it with this deployment's cap."""
        if seed in ("", -1):
            seed = None
        return GenerationParams(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)

    def max_new_tokens_limit(self, message: str = "", system: str = "", completion: bool = False) -> int:
        """The most max_new_tokens can be now: min(the operator's cap, the window minus the tokens of
        a chat of only the ``system`` prompt and ``message`` (older turns make room), or of the prompt
        ``message`` with ``completion``); the window minus one where they cannot be counted here (a
        serving endpoint's tokenizer is the engine's); the operator's cap when nothing is loaded."""
        cap, window = self.settings.max_new_tokens_cap, self.backend.context_window()
        if window is None:
            return cap
        used = (
            None if self.endpoint else self.prompts.tokens(self.manager.status(), message, system, completion)
        )
        return max(1, min(cap, window - (used or 1)))

    def context_window(self) -> int | None:
        """The model's context window (tokens), or None (nothing loaded, or not told)."""
        return self.backend.context_window()

    def serving(self) -> Serving:
        """How many visitors' replies are being written together now, and how many wait."""
        return self.manager.serving()

    def chat_format(self) -> str | None:
        """Which chat format the model uses (its chat template, a plain transcript, or the
        serving engine's)."""
        return self.backend.chat_format()

    def _check_text(self, text: object, what: str, limit: int | None = None, empty_ok: bool = False) -> str:
        if not isinstance(text, str):
            raise GenerationError(f"the {what} must be text")
        limit = limit or self.settings.max_message_chars
        if len(text) > limit:
            raise GenerationError(f"the {what} is {len(text)} characters long; the limit here is {limit}")
        if not empty_ok and not text.strip():
            raise GenerationError(f"the {what} is empty: type something to send")
        return text

    def chat(
        self,
        session_id: str,
        history: Sequence[ChatTurn],
        message: str,
        params: GenerationParams,
        system_prompt: str = "",
        waiting_status: bool = False,
        admin: str | None = None,
        cache_scope: CacheScope | None = None,
    ) -> Iterator[ChatReply]:
        """Stream a chat reply for one session; ``stop(session_id)`` ends it early.
        ``system_prompt`` replaces the default instructions (in the model's chat template, or
        as the plain transcript's preamble). With ``waiting_status``, steps with a ``status``
        (and no text) tell the place in line while the reply waits for the model. ``admin`` (the
        caller's admin credential) only words the error when no model is loaded. The prompt reuses
        what the conversation's previous turn cached, in ``cache_scope`` (by default the session's
        one conversation)."""
        message = self._check_text(message, "message")
        system_prompt = self._check_text(
            system_prompt or "", "system prompt", defaults.MAX_SYSTEM_PROMPT_CHARS, empty_ok=True
        )
        limits = self.settings
        history = checked_history(
            history, limits.max_history_turns, limits.max_message_chars, limits.max_history_chars
        )
        cap = self.settings.max_new_tokens_cap
        backend = self.backend
        scope = cache_scope or CacheScope(f"session:{session_id}", one_conversation=True)
        yield from self._streamed(
            session_id,
            lambda stop: backend.stream_chat(history, message, params, stop, cap, system_prompt, scope),
            waiting_status,
            admin,
        )

    def complete(
        self,
        session_id: str,
        prompt: str,
        params: GenerationParams,
        waiting_status: bool = False,
        admin: str | None = None,
        cache_scope: CacheScope | None = None,
    ) -> Iterator[ChatReply]:
        """Stream a continuation of ``prompt`` (the original scripts' mode); ``waiting_status`` and
        ``admin`` as in :meth:`chat`; a prefix cached in ``cache_scope`` (by default the session's)
        is reused."""
        prompt = self._check_text(prompt, "prompt")
        cap = self.settings.max_new_tokens_cap
        backend = self.backend
        scope = cache_scope or CacheScope(f"session:{session_id}")
        yield from self._streamed(
            session_id,
            lambda stop: backend.stream_completion(prompt, params, stop, cap, scope),
            waiting_status,
            admin,
        )

    def _streamed(
        self,
        session_id: str,
        start: Callable[[threading.Event], Iterator[GenerationUpdate]],
        waiting_status: bool,
        admin: str | None = None,
    ) -> Iterator[ChatReply]:
        """Run one reply with a stop event registered for the session, as ChatReply steps (the
        place-in-line steps only when ``waiting_status``). The reply holds an admission place
        from its first step to its end (refused at once when none is left: QueueFullError)."""
        with self.admission.place():
            event = self.sessions.start_reply(session_id)
            try:
                for update in start(event):
                    if update.stats is not None:
                        self.backends.record(update.stats)
                    if update.status and not waiting_status:
                        continue
                    yield ChatReply(update.text, update.stats, update.status)
            except NoModelError:
                if self.settings.public and not self.access.is_admin(admin):
                    # A visitor cannot load one: say who can, not where the (locked) button is.
                    raise NoModelForVisitorsError(
                        "no model is loaded, and visitors cannot load one here: the operator or a "
                        "signed-in admin can; try again once one is loaded"
                    ) from None
                raise
            finally:
                self.sessions.end_reply(session_id, event)

    def stop(self, session_id: str) -> bool:
        """Stop this session's running reply, if any."""
        return self.sessions.stop(session_id)

    # ---------------------------------------------------------------- API chat sessions
    def api_history(self, session_id: str) -> list[ChatTurn]:
        """The chat history of an API client session (a copy)."""
        return self.sessions.history(session_id)

    def remember_api_turn(self, session_id: str, turn: ChatTurn) -> None:
        """Append a finished turn to an API session, keeping the newest sessions and turns."""
        self.sessions.remember(session_id, turn)

    def forget_api_history(self, session_id: str) -> None:
        """Clear an API session's chat history."""
        self.sessions.forget(session_id)
