"""The model manager: the one object that owns the loaded model.

One :class:`ModelManager` is created per process and handed to whoever needs the model (the UI, the
benchmark, a script). It holds the model, tokenizer and configuration behind a lock that a load and
each generation step both take, so a reload never happens under a running step and Accelerate's
offload hooks (which move weights in and out of devices) never serve two forward passes at once.
Every reply goes through its :class:`~optdemo.runtime.batching.scheduler.BatchEngine`, which decodes the
replies of all visitors together; a load or unload stops the running ones (and says how many) first.

``load`` reuses the model when the configuration is equal, validates a new one before dropping the
current model, and frees memory for real (hooks removed, references dropped, ``gc.collect()``, the GPU
cache emptied) before loading the next.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from optdemo.core.chat_prompt import (
    CHAT_STOP_STRINGS,
    ChatTurn,
    build_chat_prompt,
    chat_format_name,
    has_chat_template,
    render_plain,
    template_renderer,
)
from optdemo.core.defaults import (
    DEFAULT_MAX_BATCH,
    LOAD_WAIT_SECONDS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_PROMPT_CHARS,
    describe_seconds,
)
from optdemo.core.errors import (
    BusyError,
    GenerationError,
    LoadError,
    NoModelError,
    OptdemoError,
    SupersededError,
)
from optdemo.core.generation import (
    CacheScope,
    GenerationParams,
    GenerationUpdate,
    context_window,
    encode_prompt,
)
from optdemo.core.load_config import LoadConfig
from optdemo.plan.bandwidth import measured_bandwidths
from optdemo.plan.planner import Plan, plan_device_map
from optdemo.plan.policy import choose_prompt_kernel
from optdemo.runtime import timing, timing_hooks
from optdemo.runtime.batching.request import Prompt, Serving
from optdemo.runtime.batching.scheduler import BatchEngine
from optdemo.runtime.draft import predicted_costs
from optdemo.runtime.loader import LoadedModel, load_model, preflight
from optdemo.runtime.readahead import ReadAheadSlot
from optdemo.runtime.status import LoadReport, ModelStatus
from optdemo.runtime.tiers.disk_map import release_disk_tier
from optdemo.runtime.tiers.gpu_policy import release as release_offload
from optdemo.system.hardware import probe_hardware
from optdemo.weights.checkpoints import ProgressCallback


class ModelManager:
    """Owns at most one loaded model; thread-safe; create one per process and pass it around."""

    def __init__(self, max_batch: int = DEFAULT_MAX_BATCH, reuse_prompts: bool = True) -> None:
        """Args:
        max_batch: the most replies decoded together (``--max-batch``); more wait in line.
        reuse_prompts: keep each prompt's cache for the next prompt that starts with it
            (``--no-prefix-cache`` turns it off; replies are the same either way).
        """
        self._model_lock = threading.Lock()  # held by a load or a generation step, never both
        self._state_lock = threading.Lock()  # guards the small fields below for status()
        self._loaded: LoadedModel | None = None
        self._busy: str | None = None
        # Every reply runs through the engine, which decodes the running ones together.
        self.engine = BatchEngine(self._model_lock, self._current, self._set_generation_busy, max_batch)
        self.engine.reuse_prompts = reuse_prompts
        # The newest load request and its number: an older one still waiting for the model lock
        # gives way to it rather than load a model nobody wants any more.
        self._load_requests = 0
        self._newest_load: LoadConfig | None = None
        self._loads_in_flight = 0  # load() calls under way (planning, waiting or loading)
        self._reading = ReadAheadSlot()  # one read-ahead at a time, the model holder's

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
        counts = self.engine.prefix_cache.counts()
        return replace(loaded.status, busy=busy, prefix_cache=counts, timing=timing.report(loaded.model))

    @property
    def current_config(self) -> LoadConfig | None:
        """The configuration of the loaded model, or None."""
        with self._state_lock:
            return self._loaded.config if self._loaded else None

    @property
    def draft_info(self) -> dict | None:
        """The loaded draft as plain data (what, its RAM read back, its load time), or None."""
        with self._state_lock:
            draft = self._loaded.draft if self._loaded else None
        return None if draft is None else draft.to_dict()

    # ---------------------------------------------------------------- loading
    def load(self, config: LoadConfig, progress: ProgressCallback | None = None) -> LoadReport:
        """Make ``config``'s model the loaded one, reusing it when the configuration is unchanged.

        A new configuration is validated first (:func:`~optdemo.runtime.loader.preflight`); only then is a
        running generation stopped, the current model freed and the new one loaded. If the load
        fails, nothing is left half-loaded and the error says why.

        Raises:
            OptdemoError: validation or load failure (the message says what to do).
            BusyError: a generation did not end within ``LOAD_WAIT_SECONDS``.
        """
        reused = self._reuse(config)
        if reused is not None:
            return reused
        hardware = probe_hardware(config.offload_folder)
        with self._state_lock:
            self._loads_in_flight += 1
            alone = self._loaded is None and self._loads_in_flight == 1
        # With nothing loaded and no other load under way, reading ahead evicts nothing in use:
        # start reading the weights while the model's code is imported and planned. Otherwise
        # only once this load holds the model and the current one is gone.
        prefetch = self._reading.claim(config, hardware, None) if alone else None
        try:
            plan = preflight(config, hardware)
            ticket = self._register_load(config)
            with self._exclusive("loading") as stopped:
                try:
                    self._check_not_superseded(config, ticket)
                    reused = self._reuse(config)  # another request may have loaded it meanwhile
                    if reused is not None:
                        return reused
                    self._set_busy(f"loading {config.display_name}")
                    try:
                        previous = self._drop_current()
                        # This load holds the model and nothing is loaded now: the disk is its.
                        prefetch = self._reading.claim(
                            config, probe_hardware(config.offload_folder), prefetch
                        )
                        try:
                            loaded = load_model(config, plan, progress)
                        except OptdemoError as exc:
                            self._reading.stop(prefetch)  # the previous model may come back
                            raise LoadError(self._after_failure(str(exc), previous)) from None
                        self._set_loaded(loaded)
                    finally:
                        self._set_busy(None)
                finally:
                    # Stop reading ahead before another load may take the model; once loaded, the
                    # model's own warm-up reads the rest, with the exact split.
                    self._reading.stop(prefetch)
        finally:
            self._reading.stop(prefetch)  # refused before it held the model
            with self._state_lock:
                self._loads_in_flight -= 1
        moved = ""
        if stopped:
            moved = (
                "; the reply in progress was stopped to apply it"
                if stopped == 1
                else f"; the {stopped} replies in progress were stopped to apply it"
            )
        message = f"loaded {config.display_name} in {loaded.status.load_seconds:.1f} s{moved}"
        return LoadReport.of(loaded.status, "loaded", message, bool(stopped))

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
        self._set_loaded(restored)
        return f"{message}. {config.display_name} is loaded again, as before."

    def unload(self) -> bool:
        """Free the loaded model (stopping the running replies). True if one was loaded."""
        with self._exclusive("unloading"):
            return self._drop_current() is not None

    @contextlib.contextmanager
    def _exclusive(self, action: str) -> Iterator[int]:
        """Hold the model for a load or unload: the engine admits nobody meanwhile, the running
        replies are stopped (yields how many), and the lock is taken once they let go of it.

        Raises:
            BusyError: the replies did not let go within ``LOAD_WAIT_SECONDS``.
        """
        self.engine.hold()
        try:
            stopped = self.engine.stop_running()
            if not self._model_lock.acquire(timeout=LOAD_WAIT_SECONDS):
                waited = describe_seconds(LOAD_WAIT_SECONDS)
                raise BusyError(f"the model is still busy after {waited}: try {action} again shortly")
            try:
                yield stopped
            finally:
                self._model_lock.release()
        finally:
            self.engine.release()

    def _current(self) -> LoadedModel | None:
        with self._state_lock:
            return self._loaded

    def _set_loaded(self, loaded: LoadedModel) -> None:
        """Make ``loaded`` current: cap the batch at the sequences its budget leaves room for, give
        the rest of that room to prompt caches, choose the kernel its prompts run on, time its
        blocks (:mod:`optdemo.runtime.timing`) and predict its draft's costs."""
        plan = loaded.status.plan
        bandwidths = measured_bandwidths()
        prompt = choose_prompt_kernel(plan.dtype, bandwidths) if plan is not None else None
        if prompt is not None and loaded.model is not None:
            loaded.model._optdemo_prompt_kernel = prompt.kernel
            timing_hooks.install(loaded.model, plan, loaded.status.device_map, bandwidths)
        loaded.status = replace(loaded.status, prompt_kernel=prompt)
        if loaded.draft is not None and plan is not None:
            loaded.draft.predicted = predicted_costs(plan, loaded.status, bandwidths)
        self.engine.room = plan.batch if plan is not None else None
        with self._state_lock:
            self._loaded = loaded

    def _drop_current(self) -> tuple[LoadConfig, Plan] | None:
        """Release every reference to the current model and return its memory (lock held).
        Returns what was loaded (configuration and plan), to restore it if a new load fails."""
        with self._state_lock:
            loaded, self._loaded = self._loaded, None
        if loaded is None:
            return None
        dropped = (loaded.config, loaded.status.plan)
        self.engine.prefix_cache.clear()  # computed by this model: meaningless for the next
        self.engine.speculator.reset()  # its costs and draft state, and its references to it
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

    def serving(self) -> Serving:
        """How many replies are being written together now, and how many wait."""
        return self.engine.serving()

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
        cache_scope: CacheScope | None = None,
    ) -> Iterator[GenerationUpdate]:
        """Continue ``prompt`` (the original scripts' mode), streaming the accumulated text (after
        status-only updates while it waits for a place in the batch); a prefix cached in
        ``cache_scope`` is reused."""

        def prepare(loaded: LoadedModel) -> Prompt:
            model, tokenizer = loaded.model, loaded.tokenizer
            ids = encode_prompt(model, tokenizer, prompt, params, max_new_tokens_cap)
            return Prompt(ids, context_window=context_window(model), **_scoped(cache_scope))

        yield from self._generate(prepare, params, stop_event)

    def stream_chat(
        self,
        history: Sequence[ChatTurn],
        message: str,
        params: GenerationParams,
        stop_event: threading.Event | None = None,
        max_new_tokens_cap: int = MAX_NEW_TOKENS_LIMIT,
        system_prompt: str = "",
        cache_scope: CacheScope | None = None,
    ) -> Iterator[GenerationUpdate]:
        """Reply to ``message`` after ``history``: through the tokenizer's chat template when it
        has one, else in a plain User/Assistant transcript. The final stats say how much of the
        window the prompt used, how many old turns were left out to fit, and how much of the prompt
        came from a cache kept in ``cache_scope`` (the conversation's previous turn)."""

        def layout(model: Any, tokenizer: Any) -> Prompt:
            templated = has_chat_template(tokenizer)
            window = context_window(model)

            def encode(text: str) -> list[int]:
                return list(tokenizer(text, add_special_tokens=not templated).input_ids)

            prompt = build_chat_prompt(
                history,
                message,
                lambda text: len(encode(text)),
                window,
                params.max_new_tokens,
                max_new_tokens_cap,
                template_renderer(tokenizer) if templated else render_plain,
                system_prompt,
                encode=encode,
            )
            if len(prompt.text) > MAX_PROMPT_CHARS:  # the engine's ceiling, as for a completion
                raise GenerationError(
                    f"the prompt is {len(prompt.text)} characters long; the limit is {MAX_PROMPT_CHARS}"
                )
            stops = () if templated else CHAT_STOP_STRINGS
            ids = list(prompt.input_ids or ())
            return Prompt(
                ids, stops, context_window=window, dropped_turns=prompt.dropped_turns, **_scoped(cache_scope)
            )

        # Laid out and tokenized here, in the caller's thread, before the request waits for the
        # model: the scheduler, which holds the model lock, only takes it (or, if another model was
        # loaded meanwhile, lays it out again for that one). A refusal comes at once.
        current = self._current()
        model, tokenizer = (current.model, current.tokenizer) if current is not None else (None, None)
        ready = layout(model, tokenizer) if model is not None and tokenizer is not None else None

        def prepare(loaded: LoadedModel) -> Prompt:
            if ready is not None and loaded is current and loaded.tokenizer is tokenizer:
                return ready
            return layout(loaded.model, loaded.tokenizer)

        for update in self._generate(prepare, params, stop_event):
            # The transcript ends with "Assistant:"; the reply itself starts after its space.
            yield replace(update, text=update.text.lstrip())

    def _generate(
        self,
        prepare: Callable[[LoadedModel], Prompt],
        params: GenerationParams,
        stop_event: threading.Event | None,
    ) -> Iterator[GenerationUpdate]:
        """One request through the engine; its final stats become the model's measured speed."""
        with self._state_lock:
            idle = self._loaded is None and self._busy is None
        if idle:  # nothing loaded and no load under way: say so now rather than wait
            raise NoModelError("no model is loaded: load one first")
        for update in self.engine.submit(prepare, params, stop_event or threading.Event()):
            if update.stats is not None:
                with self._state_lock:
                    if self._loaded is not None:
                        self._loaded.status = replace(self._loaded.status, last_stats=update.stats)
            yield update

    def _set_busy(self, what: str | None) -> None:
        with self._state_lock:
            self._busy = what

    def _set_generation_busy(self, what: str | None) -> None:
        """The engine's report ("generating ..." or None); never hides a load's own state."""
        with self._state_lock:
            if self._busy is None or self._busy.startswith("generating"):
                self._busy = what


def _scoped(scope: CacheScope | None) -> dict:
    """The prompt's cache fields for ``scope`` (none: nothing reused nor kept)."""
    if scope is None:
        return {}
    return {"cache_scope": scope.name, "one_conversation": scope.one_conversation}


def _release(loaded: LoadedModel) -> None:
    """Detach Accelerate's hooks (they hold weight maps and offload indexes) before dropping."""
    from accelerate.hooks import remove_hook_from_submodules

    # Freeing must not fail: whatever happens here, the references are dropped below.
    with contextlib.suppress(Exception):
        timing_hooks.uninstall(loaded.model)  # its hooks, and the latest reply's timing
    with contextlib.suppress(Exception):
        release_offload(loaded.model)  # prefetch buffers and pinned host memory
    with contextlib.suppress(Exception):
        release_disk_tier(loaded.model)  # the disk tier's reader threads and buffers
    with contextlib.suppress(Exception):
        remove_hook_from_submodules(loaded.model)
    loaded.model = None
    loaded.tokenizer = None
    loaded.draft = None


def _free_memory() -> None:
    """Collect the dropped model's garbage, then give the accelerator's cached blocks back (Accelerate)."""
    from accelerate.utils.memory import clear_device_cache  # imports torch: only when freeing

    clear_device_cache(garbage_collection=True)
