"""Continuous batching: every visitor's reply decoded together, one forward pass per token.

A decoding step reads every weight once whatever the batch size, so replies decoded together cost
little more than one. :class:`BatchEngine` runs one scheduler thread that, holding the model lock
for each step: (1) drops the requests that ended (stop, consumer gone, model replaced); (2) admits
waiting requests up to the batch limit in arrival order, each prompt prefilled alone and its cache
joined to the batch's, left-padded; (3) decodes one token for every running request in one
forward pass over the padded batch. It only calls the model's forward, so it serves a model in
RAM, one spread by Accelerate's hooks, and optdemo's tiers alike; each request keeps its own
sampling, stop sequences and ``max_new_tokens``. A model whose cache cannot be padded (sliding
windows, linear attention) is served one request at a time by the same loop. Why not transformers'
``ContinuousBatchingManager``: docs/ARCHITECTURE.md, "The batching engine".
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from optdemo.core.defaults import GENERATION_WAIT_SECONDS
from optdemo.core.errors import BusyError, NoModelError, OptdemoError
from optdemo.core.generation import (
    GenerationParams,
    GenerationUpdate,
    cut_at_stop,
    generation_failure,
)
from optdemo.plan.kv_room import BatchRoom, batch_in_force
from optdemo.runtime import timing
from optdemo.runtime.batching import kernels
from optdemo.runtime.batching.padded_batch import (
    PaddedBatch,
    cache_of,
    forward,
    new_cache,
    paddable,
    positions,
)
from optdemo.runtime.batching.prefix_cache import PrefixCache
from optdemo.runtime.batching.request import Prepare, Prompt, Request, Serving
from optdemo.runtime.batching.row_attention import prepare_model
from optdemo.runtime.batching.sampling import Sampler
from optdemo.runtime.batching.speculative import Speculator

# How often a waiting consumer wakes up to notice that it went away (gradio closes generators).
_POLL_SECONDS = 0.1
# The scheduler's thread: tests and the fault checks look for generation threads by this name.
THREAD_NAME = "optdemo-generate"


class BatchEngine:
    """Decodes every running request together; one per :class:`~optdemo.runtime.manager.ModelManager`.

    Args:
        model_lock: held for each step, so a load never runs under one.
        current: returns the loaded model (``LoadedModel``) or None, read at each step.
        on_busy: told what the model is doing ("generating ...") or None when idle.
        max_batch: the most requests decoded together; the rest wait in order.
    """

    def __init__(
        self,
        model_lock: threading.Lock,
        current: Callable[[], Any],
        on_busy: Callable[[str | None], None],
        max_batch: int,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self._model_lock = model_lock
        self._current = current
        self._on_busy = on_busy
        self._lock = threading.Lock()  # guards _waiting, _running and _thread
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._thread: threading.Thread | None = None
        self._batch: PaddedBatch | None = None  # scheduler thread only
        self._holds = 0  # loads and unloads waiting for the model: admit nobody meanwhile
        self._room: BatchRoom | None = None  # the KV cache room of the loaded model's plan
        self.prefix_cache = PrefixCache()  # prompts' caches for the next prompts (scheduler's)
        self.reuse_prompts = True  # keep prompts' caches (--no-prefix-cache turns it off)
        self.speculator = Speculator()  # a lone reply's speculative decoding, with a draft loaded

    # ---------------------------------------------------------------- consumers
    def submit(
        self, prepare: Prepare, params: GenerationParams, stop_event: threading.Event
    ) -> Iterator[GenerationUpdate]:
        """Queue one request and stream its updates: status-only updates (``text`` empty,
        ``status`` set) while it waits, then the accumulated text, then the final stats.
        Closing the iterator frees the request's slot at the next step."""
        request = Request(prepare, params, stop_event)
        with self._lock:
            self._waiting.append(request)
            self._start_thread()
        try:
            while True:
                try:
                    item = request.updates.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            request.gone.set()

    def counts(self) -> tuple[int, int]:
        """(requests decoding now, requests waiting for a slot)."""
        with self._lock:
            return len(self._running), len(self._waiting)

    def serving(self) -> Serving:
        """How many replies run and wait now, and the batch size in force."""
        running, waiting = self.counts()
        return Serving(running, waiting, self.limit())

    @property
    def room(self) -> BatchRoom | None:
        """The KV cache room of the loaded model's plan (None: not computed, no limit)."""
        return self._room

    @room.setter
    def room(self, room: BatchRoom | None) -> None:
        """Set on load: it caps the batch, and what the running replies cannot use of it holds the
        prompt caches (emptied: they belong to the model that computed them)."""
        self._room = room
        self.prefix_cache.clear()
        self.prefix_cache.budget_bytes = self.prefix_budget() if self.reuse_prompts else 0

    def prefix_budget(self) -> int:
        """Bytes the prompt caches may hold: the room less the running replies' worst case (the
        batch in force, each at the model's full context); without a computed room, none."""
        return 0 if self._room is None else self._room.prompt_cache_bytes(self.max_batch)

    def limit(self) -> int:
        """The batch size in force: the flag, lowered to what the memory budget holds."""
        return batch_in_force(self.max_batch, self.room)

    def stop_running(self) -> int:
        """Stop every running request (a load or unload is coming); returns how many ran. Waiting
        requests stay in line and are served by whatever model is loaded next."""
        with self._lock:
            requests = [r for r in self._running if not r.stop_event.is_set()]
        for request in requests:
            request.stop_event.set()
        return len(requests)

    def hold(self) -> None:
        """Admit no new request until :meth:`release` (a load is waiting for the model)."""
        with self._lock:
            self._holds += 1

    def release(self) -> None:
        """Undo one :meth:`hold`."""
        with self._lock:
            self._holds -= 1

    # ---------------------------------------------------------------- the scheduler
    def _start_thread(self) -> None:
        if self._thread is None:  # lock held
            self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        """Run steps until nothing runs or waits; then the thread ends (none lingers idle)."""
        try:
            while self._turn():
                pass
        except BaseException as exc:  # nobody may wait for a dead scheduler: tell them, then die
            error = generation_failure(exc)
            self._fail_running(error)
            self._fail_waiting(error)
            with self._lock:
                self._thread = None
            raise

    def _turn(self) -> bool:
        """One pass of the scheduler: a step when the model is free; False once idle."""
        with self._lock:
            if not self._running and not self._waiting:
                self._thread = None
                self._batch = None
                self._on_busy(None)
                return False
            held = self._holds > 0 and not self._running
        if held or not self._model_lock.acquire(timeout=_POLL_SECONDS):
            self._expire_waiting()
            if held:
                time.sleep(_POLL_SECONDS)
            return True
        try:
            self._step()
        except Exception as exc:  # noqa: BLE001 - every request in the step hears of it
            self._fail_running(generation_failure(exc))
        finally:
            self._model_lock.release()
        return True

    def _step(self) -> None:
        """One token boundary (model lock held): retire, admit, decode."""
        import torch

        loaded = self._current()
        with self._lock:
            held = self._holds > 0
        if held:  # a load or unload waits for the model: every running reply ends here
            for request in self._snapshot():
                request.stop_event.set()
        with torch.inference_mode():
            self._retire(loaded)
            if loaded is None or loaded.model is None:
                self._fail_waiting(NoModelError("the model was unloaded: load one first"))
                return
            self._admit(loaded)
            self._retire(loaded)  # a prefill may have ended its request already
            running = self._snapshot()
            if running:
                self._decode(loaded, running)
            self._retire(loaded)

    def _snapshot(self) -> list[Request]:
        with self._lock:
            return list(self._running)

    def _publish_busy(self) -> None:
        """Tell the manager how many replies run and wait ("generating" for one alone)."""
        running, waiting = self.counts()
        if not running and not waiting:
            self._on_busy(None)
        elif running == 1 and not waiting:
            self._on_busy("generating")
        else:
            self._on_busy(f"generating ({running} replies at once, {waiting} waiting)")

    # ---------------------------------------------------------------- leaving
    def _retire(self, loaded: Any) -> None:
        """Finish the running requests that ended, and drop their rows from the batch."""
        ended: list[int] = []
        for index, request in enumerate(self._snapshot()):
            if request.loaded is not loaded:  # the model was replaced under it: it was stopped
                request.stop_event.set()
            if request.gone.is_set() or request.stop_event.is_set():
                request.done = True
            if request.done:
                ended.append(index)
        if not ended:
            return
        with self._lock:
            finished = [self._running[i] for i in ended]
            self._running = [r for i, r in enumerate(self._running) if i not in ended]
            left = bool(self._running)
        if self._batch is not None:
            self._batch = self._batch.without(ended) if left else None
        self._publish_busy()  # before the final updates: a consumer that got one sees it idle
        for request in finished:
            self._finish(request)

    def _finish(self, request: Request) -> None:
        """Send the request's final update (its stats) unless its consumer went away."""
        speculation = self.speculator.finish(request)  # its stats, and it leaves the speculator
        if request.gone.is_set():
            return
        end = time.perf_counter()
        text, _ = cut_at_stop(request.text, request.stops, final=True)
        stats = request.final_stats(end, speculation)
        reply = tuple(request.ids[len(request.prompt.input_ids) :]) if request.prompt else ()
        timing.finish(request, end)  # where its time went, per block: the model's latest reply
        request.updates.put(GenerationUpdate(text, stats, token_ids=reply))

    def _fail_running(self, error: Exception) -> None:
        with self._lock:
            failed, self._running = self._running, []
        self._batch = None
        for request in failed:
            request.updates.put(error)
        self._publish_busy()

    def _fail_waiting(self, error: Exception) -> None:
        with self._lock:
            failed = list(self._waiting)
            self._waiting.clear()
        for request in failed:
            request.updates.put(error)

    def _expire_waiting(self) -> None:
        """Drop the waiting requests that left, were stopped (they end with no tokens) or
        waited longer than ``GENERATION_WAIT_SECONDS``."""
        now = time.perf_counter()
        with self._lock:
            left = [r for r in self._waiting if r.gone.is_set() or r.stop_event.is_set()]
            late = [r for r in self._waiting if r not in left and now - r.submitted > GENERATION_WAIT_SECONDS]
            for request in (*left, *late):
                self._waiting.remove(request)
        for request in left:
            request.prompt = Prompt([])
            self._finish(request)
        for request in late:
            request.updates.put(BusyError("the model is busy with other requests: try again in a moment"))
        if left or late:
            self._tell_positions()

    # ---------------------------------------------------------------- joining
    def _admit(self, loaded: Any) -> None:
        """Move waiting requests into the batch up to the limit, prefilling each alone; tell the
        rest their place in line."""
        self._expire_waiting()
        limit = self.limit() if paddable(loaded.model) else 1
        while True:
            with self._lock:
                if not self._waiting or len(self._running) >= limit or self._holds:
                    break
                request = self._waiting.popleft()
            timing.admitted(request)  # its wait in line ends here
            try:
                request.prompt = request.prepare(loaded)
            except Exception as exc:  # noqa: BLE001 - this request's own error, for its consumer
                request.updates.put(exc if isinstance(exc, OptdemoError) else generation_failure(exc))
                continue
            request.loaded = loaded
            self._prefill(loaded, request)
        self._tell_positions()
        self._publish_busy()  # the waiting count may have changed too

    def _tell_positions(self) -> None:
        """Tell each waiting request its place in line when it changed."""
        with self._lock:
            waiting = list(self._waiting)
            running = len(self._running)
        for place, request in enumerate(waiting, start=1):
            if request.place == place:
                continue  # told already
            request.place = place
            status = (
                f"Waiting for the model: number {place} in line ({running} "
                f"{'reply' if running == 1 else 'replies'} being written, at most {self.limit()} at once)"
            )
            request.updates.put(GenerationUpdate("", status=status))

    def _prefill(self, loaded: Any, request: Request) -> None:
        """Run the request's prompt alone (after the longest prefix cached for its scope), take its
        first token, keep its cache for the next prompt, and join the batch. A prefill that fails
        (say, memory for a long prompt) fails that request only."""
        import torch

        assert request.prompt is not None
        choice = prepare_model(loaded.model)
        prompt = request.prompt
        request.ids = list(prompt.input_ids)
        request.sampler = Sampler(request.params)
        hit = self.prefix_cache.lookup(prompt.cache_scope, request.ids) if choice.exact else None
        done = hit.tokens if hit is not None else 0
        cache = new_cache(loaded.model) if hit is None else cache_of(loaded.model.config, hit.layers)
        ids = torch.tensor([request.ids[done:]], dtype=torch.long, device=loaded.input_device)
        mask = torch.ones((1, len(request.ids)), dtype=torch.long, device=ids.device)
        with self._lock:
            self._running.append(request)
        self._publish_busy()
        started = time.perf_counter()
        try:
            with kernels.computing(kernels.PROMPT, choice), timing.charged_to([request]):
                logits = forward(loaded.model, ids, mask, positions([done], ids.shape[1], ids.device), cache)
        except Exception as exc:  # noqa: BLE001 - this request's own failure, for its consumer
            with self._lock:
                self._running.remove(request)
            self._publish_busy()
            request.updates.put(generation_failure(exc))
            return
        request.prompt_seconds = time.perf_counter() - started
        request.cached_tokens = done
        if choice.exact:  # the rows just computed are what any later prompt computes for them
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            self.prefix_cache.store(prompt.cache_scope, request.ids, layers, prompt.one_conversation)
        self._batch = (
            PaddedBatch.of(loaded.model, cache) if self._batch is None else self._batch.with_row(cache)
        )
        self._emit(loaded, request, request.sampler.next_token(request.ids, logits[0]))

    # ---------------------------------------------------------------- decoding
    def _decode(self, loaded: Any, running: list[Request]) -> None:
        """One forward pass for every running request's last token (alone with a draft: speculative)."""
        import torch

        batch = self._batch
        assert batch is not None and batch.size == len(running)
        if self.speculator.step(loaded, running, batch, self.counts()[1], self._emit):
            return
        device = loaded.input_device
        ids = torch.tensor([[r.ids[-1]] for r in running], dtype=torch.long, device=device)
        starts = [len(r.ids) - 1 for r in running]
        mask = batch.grown_mask()
        with kernels.computing(kernels.STEP, prepare_model(loaded.model)), timing.charged_to(running):
            logits = forward(loaded.model, ids, mask.to(device), positions(starts, 1, device), batch.cache)
        batch.mask = mask
        for request, row in zip(running, logits, strict=True):
            request.peak_batch = max(request.peak_batch, len(running))
            assert request.sampler is not None
            self._emit(loaded, request, request.sampler.next_token(request.ids, row))

    def _emit(self, loaded: Any, request: Request, token: int) -> None:
        """Add the request's next token and stream the new text (a stop sequence, the end of text or
        ``max_new_tokens`` ends it); the token comes from its sampler or a speculative pass."""
        now = time.perf_counter()
        request.first_at = request.first_at or now
        request.last_at = now
        request.ids.append(token)
        request.generated += 1
        tokenizer = loaded.tokenizer
        request.text = tokenizer.decode(
            request.ids[len(request.prompt.input_ids) :], skip_special_tokens=True
        )
        visible, hit = cut_at_stop(request.text, request.stops)
        eos = _eos_ids(loaded)
        if hit:
            request.stop_hit = True
            request.stop_event.set()
        if hit or token in eos or request.generated >= request.params.max_new_tokens:
            request.done = True
        elif visible and visible != request.shown and not visible.endswith("\ufffd"):
            request.shown = visible
            request.updates.put(GenerationUpdate(visible))


def _eos_ids(loaded: Any) -> set[int]:
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
