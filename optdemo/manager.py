"""The model manager: the one object that owns the loaded model.

One :class:`ModelManager` is created per process and handed to whoever needs the model (the UI, the
benchmark, a script). It holds the model, tokenizer and configuration behind a lock that a load and
a generation both take, so a reload never happens under a running generation and Accelerate's
offload hooks (which move weights in and out of devices) never serve two forward passes at once.

``load`` reuses the model when the configuration is equal, validates a new one before dropping the
current model, and frees memory for real (hooks removed, references dropped, ``gc.collect()``, the GPU
cache emptied) before loading the next.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

from optdemo.chat_prompt import (
    CHAT_STOP_STRINGS,
    ChatTurn,
    build_chat_prompt,
    chat_format_name,
    has_chat_template,
    render_plain,
    template_renderer,
)
from optdemo.config import LoadConfig
from optdemo.defaults import (
    GENERATION_WAIT_SECONDS,
    LOAD_WAIT_SECONDS,
    MAX_NEW_TOKENS_LIMIT,
    describe_seconds,
)
from optdemo.disk_stream import release as release_disk_stream
from optdemo.errors import BusyError, GenerationError, LoadError, NoModelError, OptdemoError, SupersededError
from optdemo.generation import GenerationParams, GenerationUpdate, context_window, stream_generate
from optdemo.gpu_offload import release as release_offload
from optdemo.hardware import probe_hardware
from optdemo.loader import LoadedModel, ProgressCallback, load_model, preflight
from optdemo.planner import Plan, plan_device_map
from optdemo.status import LoadReport, ModelStatus


class ModelManager:
    """Owns at most one loaded model; thread-safe; create one per process and pass it around."""

    def __init__(self) -> None:
        self._model_lock = threading.Lock()  # held by a load or a generation, never both
        self._state_lock = threading.Lock()  # guards the small fields below for status()
        self._loaded: LoadedModel | None = None
        self._busy: str | None = None
        self._active_stop: threading.Event | None = None
        # The newest load request and its number: an older one still waiting for the model lock
        # gives way to it rather than load a model nobody wants any more.
        self._load_requests = 0
        self._newest_load: LoadConfig | None = None

    # ---------------------------------------------------------------- inspection
    def plan(self, config: LoadConfig) -> Plan:
        """Plan ``config`` without touching weights or the loaded model."""
        return plan_device_map(config, probe_hardware(config.offload_folder))

    def status(self) -> ModelStatus:
        """What is loaded, and whether a load or generation is running."""
        with self._state_lock:
            loaded, busy = self._loaded, self._busy
        if loaded is None:
            return ModelStatus(None, busy)
        return replace(loaded.status, busy=busy)

    @property
    def current_config(self) -> LoadConfig | None:
        """The configuration of the loaded model, or None."""
        with self._state_lock:
            return self._loaded.config if self._loaded else None

    # ---------------------------------------------------------------- loading
    def load(self, config: LoadConfig, progress: ProgressCallback | None = None) -> LoadReport:
        """Make ``config``'s model the loaded one, reusing it when the configuration is unchanged.

        A new configuration is validated first (:func:`~optdemo.loader.preflight`); only then is a
        running generation stopped, the current model freed and the new one loaded. If the load
        fails, nothing is left half-loaded and the error says why.

        Raises:
            OptdemoError: validation or load failure (the message says what to do).
            BusyError: a generation did not end within ``LOAD_WAIT_SECONDS``.
        """
        reused = self._reuse(config)
        if reused is not None:
            return reused
        plan = preflight(config, probe_hardware(config.offload_folder))
        ticket = self._register_load(config)
        stopped = self._stop_active_generation()
        self._take_model_lock("loading")
        try:
            self._check_not_superseded(config, ticket)
            reused = self._reuse(config)  # another request may have loaded it meanwhile
            if reused is not None:
                return reused
            self._set_busy(f"loading {config.display_name}")
            previous = self._drop_current()
            try:
                loaded = load_model(config, plan, progress)
            except OptdemoError as exc:
                raise LoadError(self._after_failure(str(exc), previous)) from None
            with self._state_lock:
                self._loaded = loaded
        finally:
            self._set_busy(None)
            self._model_lock.release()
        moved = "; the reply in progress was stopped to apply it" if stopped else ""
        message = f"loaded {config.display_name} in {loaded.status.load_seconds:.1f} s{moved}"
        return LoadReport.of(loaded.status, "loaded", message, stopped)

    def _register_load(self, config: LoadConfig) -> int:
        """Record ``config`` as the newest load request; returns its number."""
        with self._state_lock:
            self._load_requests += 1
            self._newest_load = config
            return self._load_requests

    def _check_not_superseded(self, config: LoadConfig, ticket: int) -> None:
        """Refuse to start a load that a newer request for another configuration replaced while it
        waited for the model (lock held).

        Raises:
            SupersededError: naming both models.
        """
        with self._state_lock:
            newest = self._newest_load if ticket != self._load_requests else None
        if newest is not None and newest != config:
            raise SupersededError(
                f"loading {config.display_name} was not started: a newer request to load "
                f"{newest.display_name} replaced it"
            )

    def _reuse(self, config: LoadConfig) -> LoadReport | None:
        started = time.perf_counter()
        with self._state_lock:
            loaded = self._loaded
        if loaded is None or loaded.config != config:
            return None
        message = f"{config.display_name} is already loaded with this configuration: nothing reloaded"
        state = replace(loaded.status, load_seconds=time.perf_counter() - started)
        return LoadReport.of(state, "reused", message)

    def _after_failure(self, message: str, previous: tuple[LoadConfig, Plan] | None) -> str:
        """Leave a clean, usable state after a failed load (lock held): free what the failed load
        left, then bring the previous model back when there was one. Returns the message to show,
        which says what is loaded now."""
        _free_memory()
        if previous is None:
            return f"{message}. No model is loaded now."
        config, plan = previous
        try:
            restored = load_model(config, plan)
        except OptdemoError:
            _free_memory()
            return f"{message}. {config.display_name} was unloaded to make room and could not be reloaded."
        with self._state_lock:
            self._loaded = restored
        return f"{message}. {config.display_name} is loaded again, as before."

    def unload(self) -> bool:
        """Free the loaded model (stopping a running generation). True if one was loaded."""
        self._stop_active_generation()
        self._take_model_lock("unloading")
        try:
            return self._drop_current() is not None
        finally:
            self._model_lock.release()

    def _take_model_lock(self, action: str) -> None:
        """Wait up to ``LOAD_WAIT_SECONDS`` for a stopped generation to let go of the model."""
        if not self._model_lock.acquire(timeout=LOAD_WAIT_SECONDS):
            waited = describe_seconds(LOAD_WAIT_SECONDS)
            raise BusyError(f"the model is still busy after {waited}: try {action} again shortly")

    def _drop_current(self) -> tuple[LoadConfig, Plan] | None:
        """Release every reference to the current model and return its memory (lock held).
        Returns what was loaded (configuration and plan), to restore it if a new load fails."""
        with self._state_lock:
            loaded, self._loaded = self._loaded, None
        if loaded is None:
            return None
        dropped = (loaded.config, loaded.status.plan)
        _release(loaded)
        del loaded
        _free_memory()
        return dropped

    # ---------------------------------------------------------------- generation
    def context_window(self) -> int | None:
        """The loaded model's context window (tokens), or None when nothing is loaded."""
        with self._state_lock:
            loaded = self._loaded
            return None if loaded is None or loaded.model is None else context_window(loaded.model)

    def chat_format(self) -> str | None:
        """Which chat format the loaded model uses (its chat template or a plain transcript)."""
        with self._state_lock:
            loaded = self._loaded
            return None if loaded is None or loaded.tokenizer is None else chat_format_name(loaded.tokenizer)

    def stream_completion(
        self,
        prompt: str,
        params: GenerationParams,
        stop_event: threading.Event | None = None,
        max_new_tokens_cap: int = MAX_NEW_TOKENS_LIMIT,
    ) -> Iterator[GenerationUpdate]:
        """Continue ``prompt`` (the original scripts' mode), streaming the accumulated text."""
        with self._using_model(stop_event) as (loaded, event):
            yield from _recording_stats(
                loaded,
                stream_generate(
                    loaded.model,
                    loaded.tokenizer,
                    prompt,
                    params,
                    input_device=loaded.input_device,
                    stop_event=event,
                    max_new_tokens_cap=max_new_tokens_cap,
                ),
            )

    def stream_chat(
        self,
        history: Sequence[ChatTurn],
        message: str,
        params: GenerationParams,
        stop_event: threading.Event | None = None,
        max_new_tokens_cap: int = MAX_NEW_TOKENS_LIMIT,
        system_prompt: str = "",
    ) -> Iterator[GenerationUpdate]:
        """Reply to ``message`` after ``history``: through the tokenizer's chat template when it
        has one, else in a plain User/Assistant transcript. The final stats say how much of the
        window the prompt used and how many old turns were left out to fit."""
        if not isinstance(message, str) or not message.strip():
            raise GenerationError("the message is empty: type something to send")
        with self._using_model(stop_event) as (loaded, event):
            tokenizer = loaded.tokenizer
            templated = has_chat_template(tokenizer)
            window = context_window(loaded.model)
            prompt = build_chat_prompt(
                history,
                message,
                lambda text: len(tokenizer(text, add_special_tokens=not templated).input_ids),
                window,
                params.max_new_tokens,
                max_new_tokens_cap,
                template_renderer(tokenizer) if templated else render_plain,
                system_prompt,
            )
            for update in stream_generate(
                loaded.model,
                tokenizer,
                prompt.text,
                params,
                input_device=loaded.input_device,
                stop_event=event,
                stop_strings=() if templated else CHAT_STOP_STRINGS,
                max_new_tokens_cap=max_new_tokens_cap,
                add_special_tokens=not templated,
            ):
                if update.stats is not None:
                    stats = replace(update.stats, dropped_turns=prompt.dropped_turns, context_window=window)
                    loaded.status = replace(loaded.status, last_stats=stats)
                    update = replace(update, stats=stats)
                # The transcript ends with "Assistant:"; the reply itself starts after its space.
                yield replace(update, text=update.text.lstrip())

    def _using_model(self, stop_event: threading.Event | None):
        """Hold the model for one generation (a context manager yielding it and its stop event)."""
        return _ModelUse(self, stop_event or threading.Event())

    def _stop_active_generation(self) -> bool:
        with self._state_lock:
            event = self._active_stop
        if event is not None and not event.is_set():
            event.set()
            return True
        return False

    def _set_busy(self, what: str | None) -> None:
        with self._state_lock:
            self._busy = what


def _recording_stats(loaded: LoadedModel, updates: Iterator[GenerationUpdate]) -> Iterator[GenerationUpdate]:
    """Pass updates through, keeping the final stats as the loaded model's measured speed."""
    window = context_window(loaded.model)
    for update in updates:
        if update.stats is not None:
            update = replace(update, stats=replace(update.stats, context_window=window))
            loaded.status = replace(loaded.status, last_stats=update.stats)
        yield update


class _ModelUse:
    """Context manager: wait for the model lock, expose the loaded model, always release."""

    def __init__(self, manager: ModelManager, stop_event: threading.Event) -> None:
        self.manager = manager
        self.stop_event = stop_event

    def __enter__(self) -> tuple[LoadedModel, threading.Event]:
        manager = self.manager
        with manager._state_lock:
            idle = manager._loaded is None and manager._busy is None
        if idle:  # nothing loaded and no load under way: say so now rather than wait
            raise NoModelError("no model is loaded: load one first")
        if not manager._model_lock.acquire(timeout=GENERATION_WAIT_SECONDS):
            raise BusyError("the model is busy with other requests: try again in a moment")
        with manager._state_lock:
            loaded = manager._loaded
            if loaded is not None:
                manager._active_stop = self.stop_event
                manager._busy = "generating"
        if loaded is None:
            manager._model_lock.release()
            raise NoModelError("the model was unloaded: load one first")
        return loaded, self.stop_event

    def __exit__(self, *exc: object) -> None:
        manager = self.manager
        with manager._state_lock:
            if manager._active_stop is self.stop_event:
                manager._active_stop = None
            manager._busy = None
        manager._model_lock.release()


def _release(loaded: LoadedModel) -> None:
    """Detach Accelerate's hooks (they hold weight maps and offload indexes) before dropping."""
    from accelerate.hooks import remove_hook_from_submodules

    # Freeing must not fail: whatever happens here, the references are dropped below.
    with contextlib.suppress(Exception):
        release_offload(loaded.model)  # prefetch buffers and pinned host memory
    with contextlib.suppress(Exception):
        release_disk_stream(loaded.model)  # the disk-tier reader thread and its buffers
    with contextlib.suppress(Exception):
        remove_hook_from_submodules(loaded.model)
    loaded.model = None
    loaded.tokenizer = None


def _free_memory() -> None:
    """Collect the dropped model's garbage, then hand the accelerator's cached blocks back to the
    driver (CUDA, XPU, MPS, ...: Accelerate knows each backend's call)."""
    from accelerate.utils.memory import clear_device_cache  # imports torch: only when freeing

    clear_device_cache(garbage_collection=True)
