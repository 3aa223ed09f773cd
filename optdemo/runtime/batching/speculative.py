"""Speculative decoding for a reply alone on the model: a draft proposes, one pass verifies.

When a draft is loaded (:mod:`optdemo.runtime.draft`) and exactly one reply is being written with
nobody waiting, each of the engine's decoding steps is a speculative pass: the draft proposes k
tokens, one at a time, on a KV cache of its own for that reply; the model then computes its last
token and the k proposals in ONE forward pass with the STEP kernels, whose every row has the bits
of a one-token step (:mod:`optdemo.runtime.batching.kernels`, row by row attention), and keeps:

* greedy: the proposals up to the first that differs from the model's own choice, then the model's
  own token, so the reply is token for token the one the model writes alone;
* sampling: each proposal d with probability min(1, p(d) / q(d)) on the reply's processed
  distributions (p the model's, q the draft's), the first rejected one replaced by a sample of
  norm(max(0, p - q)), and a bonus token from the last position when all are kept (Leviathan et
  al. 2023, algorithm 1), so the tokens are distributed exactly as the model's own.

The caches keep only the positions of tokens kept. Stop sequences, the end of text,
``max_new_tokens`` and Stop end a reply inside a kept run: no token is sent past them.

A pass reads the model's weights once however many tokens it checks, so where reading them is the
cost (a disk tier) a pass over k + 1 tokens costs about one over a single token, and each kept
proposal is a token that needed no pass of its own; in RAM on a CPU, computing dominates and it
may not pay. k is chosen before each pass from costs measured as they happen, per loaded model
(a one-token pass, each further token of a pass, a draft token; the plan's predictions until
measured, so a draft that cannot pay here is released before a speculative pass is spent) and the
acceptance seen so far in this reply (with the model's recent replies as the prior), by the rule
the plan predicts with (:func:`optdemo.plan.policy.choose_draft_length`); k = 0 is plain
decoding. With other replies running, batching already shares each pass: a reply that is joined
drops its draft state and decodes in the batch, and speculates again once it is alone.
"""

from __future__ import annotations

import gc
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optdemo.plan.policy import MAX_DRAFT_LENGTH, DraftCosts, choose_draft_length
from optdemo.runtime.batching import kernels
from optdemo.runtime.batching.padded_batch import PaddedBatch, _keeps_logits, forward, new_cache, positions
from optdemo.runtime.batching.request import Request
from optdemo.runtime.batching.row_attention import prepare_model

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

# Measured costs are smoothed over passes (exponential moving average, this weight for the newest).
SMOOTHING = 0.3
# A reply's acceptance starts from the model's recent replies, weighted as this many proposals, and
# before any reply was measured from this rate.
PRIOR_WEIGHT = 4.0
PRIOR_ACCEPTANCE = 0.7
EXPLORE_K = 3  # the draft length that measures a pass's extra cost and the draft's, once per model
REMEASURE_EVERY = 32  # speculative passes between plain ones, which keep the one-token cost fresh
PROBE_EVERY = 32  # plain passes in a row after which one proposal checks whether acceptance rose
_OPTIMISTIC = 0.95  # the acceptance a probe is worth trying for

# The engine's token sink: records the token for the reply, streams it, and marks the reply done
# on a stop sequence, the end of text or max_new_tokens (BatchEngine._emit).
Emit = Callable[[Any, Request, int], None]


@dataclass
class ReplyCounts:
    """One reply's speculation: proposals, how many were kept, passes ending at a rejection, and the
    draft length of each pass."""

    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    lengths: list[int] = field(default_factory=list)

    def fields(self) -> dict:
        """The reply's ``GenerationStats`` fields."""
        passes = {"passes": len(self.lengths), "draft_lengths": tuple(self.lengths)}
        return {"drafted": self.drafted, "accepted": self.accepted, **passes}


@dataclass
class Measured:
    """What passes cost on the loaded model (seconds; None until measured) and the acceptance of
    its recent replies."""

    one_pass: float | None = None
    per_extra_token: float | None = None
    draft_token: float | None = None
    acceptance: float = PRIOR_ACCEPTANCE
    released: str | None = None  # why the draft was let go: no acceptance could make it pay here
    predicted: DraftCosts | None = None  # the plan's costs here, for those not measured yet

    def costs(self) -> DraftCosts | None:
        """The costs the choice of k weighs: each as measured, else as the plan predicts it; None
        until a one-token pass is measured, or while a cost is neither measured nor predicted."""
        extra, draft, slowdown = self.per_extra_token, self.draft_token, 1.0
        if self.predicted is not None:
            extra = self.predicted.per_extra_token if extra is None else extra
            draft = self.predicted.draft_token if draft is None else draft
            slowdown = self.predicted.drafting_slowdown
        if self.one_pass is None or extra is None or draft is None:
            return None
        return DraftCosts(self.one_pass, extra, draft, slowdown)

    def describe(self, costs: DraftCosts) -> str:
        """``costs`` for people, saying which are the plan's prediction rather than measured."""
        extra = "" if self.per_extra_token is not None else " (predicted)"
        draft = "" if self.draft_token is not None else " (predicted)"
        slower = costs.drafting_slowdown
        drafting = f" ({slower:.2g}x while drafting, predicted)" if slower > 1.01 else ""
        return (
            f"a pass costs {costs.one_pass:.2f} s{drafting}, each further token "
            f"{costs.per_extra_token:.2f} s{extra} more and a draft token {costs.draft_token:.2f} s{draft}"
        )


@dataclass
class DraftState:
    """The draft's side of the lone reply: its KV cache, and how many of the reply's tokens it holds."""

    request: Request
    cache: Any
    seen: int = 0
    generator: torch.Generator | None = None  # the draft's own draws (sampling)


def _smoothed(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)


class Speculator:
    """The batching engine's speculative decoding (scheduler thread only): one per engine."""

    def __init__(self) -> None:
        self.fixed_k: int | None = None  # tests: always this draft length (within the limits)
        self.measured = Measured()
        self._owner: Any = None  # the LoadedModel the measurements are of
        self._state: DraftState | None = None
        self._counts: weakref.WeakKeyDictionary[Request, ReplyCounts] = weakref.WeakKeyDictionary()
        self._plain_run = 0  # plain passes in a row
        self._since_plain = 0  # speculative passes since the last plain one
        self._warm = False  # the model's first pass (kernel probes, cold caches) is not measured

    def reset(self) -> None:
        """Forget the model (another is loaded, or none): its costs, draft state and references."""
        self.measured = Measured()
        self._owner = None
        self._state = None
        self._plain_run = self._since_plain = 0
        self._warm = False

    def step(
        self, loaded: Any, running: Sequence[Request], batch: PaddedBatch, waiting: int, emit: Emit
    ) -> bool:
        """Decode the lone reply speculatively (a pass of k = 0 included); False, with any draft
        state dropped, when the engine decodes plainly: no draft, several replies running or some
        waiting, or a model whose rows are not computed exactly (then a pass over several tokens
        would not give a one-token step's bits)."""
        draft = getattr(loaded, "draft", None)
        if draft is None or len(running) != 1 or waiting:
            self._state = None
            return False
        if self._owner is not loaded:
            self.reset()
            self._owner = loaded
            self.measured.predicted = draft.predicted
        if self._release_if_hopeless(loaded):
            self._state = None
            return False
        request = running[0]
        cached = len(request.ids) - 1  # the reply's last token is not in the cache yet
        unpadded = batch.mask.shape[1] == cached and bool(batch.mask.all())
        if not unpadded or not prepare_model(loaded.model).exact:
            self._state = None
            return False
        if self._state is None or self._state.request is not request:
            self._state = DraftState(request, new_cache(draft.model))
        self._pass(loaded, request, batch, self.choose_k(request, draft.window), emit)
        return True

    def finish(self, request: Request) -> dict:
        """A reply ended: its stats fields (empty without a pass), and its acceptance joins the
        model's recent ones."""
        if self._state is not None and self._state.request is request:
            self._state = None
        counts = self._counts.pop(request, None)
        if counts is None:
            return {}
        if counts.accepted + counts.rejected:
            rate = counts.accepted / (counts.accepted + counts.rejected)
            self.measured.acceptance = _smoothed(self.measured.acceptance, rate)
        return counts.fields()

    def _release_if_hopeless(self, loaded: Any) -> bool:
        """Let the draft go once the costs show that no draft length pays even at an acceptance of
        ``_OPTIMISTIC`` (e.g. a CPU without float16 units, where every further token of a pass costs
        another float16 product): its RAM goes back to the model's page cache, and the reason is
        kept in ``measured.released``. With the plan's prediction this is known after the first
        measured one-token pass, before any speculative pass is spent on finding out. A configured
        ``fixed_k`` (tests, ``generate --draft-length``) never releases."""
        costs = self.measured.costs()
        if costs is None or self.fixed_k is not None or choose_draft_length(costs, _OPTIMISTIC)[0]:
            return False
        name = loaded.draft.display_name
        loaded.draft = None  # the last reference besides this engine's state, which goes too
        self._state = None
        gc.collect()
        self.measured.released = (
            f"the draft {name} was released: here {self.measured.describe(costs)}, so no acceptance "
            "rate makes speculation pay; reload with the draft to try again"
        )
        log.warning("%s", self.measured.released)
        return True

    # ---------------------------------------------------------------- choosing k
    def acceptance(self, request: Request) -> float:
        """The chance that a proposal is kept in this reply: kept proposals over kept and rejected
        (a pass stops at its first rejection), starting from the model's recent replies."""
        counts = self._counts.get(request) or ReplyCounts()
        seen = counts.accepted + counts.rejected
        rate = (counts.accepted + PRIOR_WEIGHT * self.measured.acceptance) / (seen + PRIOR_WEIGHT)
        return min(rate, 0.99)

    def choose_k(self, request: Request, window: int) -> int:
        """The next pass's draft length: within the reply's remaining tokens and the draft's window,
        the best by the costs. Plain passes first (a warm-up, then their cost); then, where the plan
        predicted the other costs, the rule's k by them (each replaced by its measurement once one
        is made), else one pass of ``EXPLORE_K`` to measure them; a plain pass now and then, and a
        single proposal after a long plain run (has acceptance risen?)."""
        remaining = request.params.max_new_tokens - request.generated
        cap = min(MAX_DRAFT_LENGTH, remaining - 1, window - len(request.ids))
        if cap <= 0:
            return 0
        measured = self.measured
        if measured.one_pass is None:
            return 0  # a warm-up, then the one-token pass every other cost is weighed against
        if self.fixed_k is not None:
            return min(self.fixed_k, cap)
        if self._since_plain >= REMEASURE_EVERY:
            return 0
        costs = measured.costs()
        if costs is None:
            return min(EXPLORE_K, cap)
        k, _ = choose_draft_length(costs, self.acceptance(request), cap)
        if k == 0 and self._plain_run >= PROBE_EVERY and choose_draft_length(costs, _OPTIMISTIC, cap)[0]:
            return 1
        return k

    # ---------------------------------------------------------------- one pass
    def _pass(self, loaded: Any, request: Request, batch: PaddedBatch, k: int, emit: Emit) -> None:
        """Propose ``k`` tokens, verify them in one pass, keep what the rule keeps and send it."""
        import torch

        state = self._state
        assert state is not None and request.sampler is not None
        known = len(request.ids)
        proposals, q_rows = self._propose(loaded.draft.model, request, state, k)
        started = time.perf_counter()
        rows = verify(loaded, batch, [request.ids[-1], *proposals], known - 1)
        if rows.device.type == "cuda":
            torch.cuda.synchronize(rows.device)
        self._measure_pass(k + 1, time.perf_counter() - started)
        if request.params.temperature == 0:
            kept, token = accept_greedy(request, proposals, rows)
        else:
            p_rows = [
                probabilities(request.sampler.processors, [*request.ids, *proposals[:i]], row)
                for i, row in enumerate(rows)
            ]
            kept, token = accept_sampled(p_rows, q_rows, proposals, _generator(request, rows.device))
        if k:
            counts = self._counts.setdefault(request, ReplyCounts())
            counts.drafted, counts.accepted = counts.drafted + k, counts.accepted + kept
            counts.rejected += kept < k
            counts.lengths.append(k)
        sent = 0
        for new in [*proposals[:kept], token]:
            emit(loaded, request, new)
            sent += 1
            if request.done or request.stop_event.is_set() or request.gone.is_set():
                break  # a stop sequence, the end of text, max_new_tokens or Stop: nothing more
        crop(batch.cache, known - 1 + sent)
        batch.mask = batch.mask[:, : known - 1 + sent]
        if state.seen > known + min(kept, sent):  # the draft saw proposals that were not kept
            state.seen = known + min(kept, sent)
            crop(state.cache, state.seen)

    def _propose(
        self, draft: Any, request: Request, state: DraftState, k: int
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """The draft's ``k`` proposals, each with the distribution it was drawn from (None for
        greedy); its cache first takes the reply's tokens it has not seen."""
        import torch

        assert request.sampler is not None
        context, proposals, q_rows = list(request.ids), [], []
        for _ in range(k):
            feed = context[state.seen :]
            started = time.perf_counter()
            ids = torch.tensor([feed], dtype=torch.long)
            mask = torch.ones((1, state.seen + len(feed)), dtype=torch.long)
            logits = forward(draft, ids, mask, positions([state.seen], len(feed), "cpu"), state.cache)[0]
            state.seen += len(feed)
            if request.params.temperature == 0:
                token, q = request.sampler.next_token(context, logits), None
            else:
                q = probabilities(request.sampler.processors, context, logits)
                if state.generator is None:
                    state.generator = torch.Generator().manual_seed(_draft_seed(request))
                token = int(torch.multinomial(q, 1, generator=state.generator))
            if len(feed) == 1:  # a catch-up over several tokens is no draft token's cost
                seconds = time.perf_counter() - started
                self.measured.draft_token = _smoothed(self.measured.draft_token, seconds)
            proposals.append(token)
            q_rows.append(q)
            context.append(token)
        return proposals, q_rows

    def _measure_pass(self, tokens: int, seconds: float) -> None:
        """Record a pass's time: a one-token pass's own, or what each further token added to a pass
        while drafting (the model's first pass warms up: not recorded)."""
        measured = self.measured
        if not self._warm:
            self._warm = True
            return
        if tokens == 1:
            measured.one_pass = _smoothed(measured.one_pass, seconds)
            self._plain_run, self._since_plain = self._plain_run + 1, 0
            return
        self._plain_run, self._since_plain = 0, self._since_plain + 1
        if measured.one_pass is not None:
            slowdown = measured.predicted.drafting_slowdown if measured.predicted else 1.0
            extra = max(0.0, (seconds - measured.one_pass * slowdown) / (tokens - 1))
            measured.per_extra_token = _smoothed(measured.per_extra_token, extra)


# ---------------------------------------------------------------- the rules
def verify(loaded: Any, batch: PaddedBatch, tokens: list[int], start: int) -> torch.Tensor:
    """The model's logits (float32, one row per token) for ``tokens`` fed at positions ``start``
    on, in one pass over the lone reply's cache (which grows by them, as its mask does): row i is
    what a one-token step after the first i of them computes, to the bit."""
    import torch

    count, device = len(tokens), loaded.input_device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    mask = torch.cat([batch.mask, torch.ones((1, count), dtype=torch.long)], dim=1)
    extra = {"logits_to_keep": count} if _keeps_logits(loaded.model) else {}
    with kernels.computing(kernels.STEP, prepare_model(loaded.model)):
        out = loaded.model(
            input_ids=ids,
            attention_mask=mask.to(device),
            position_ids=positions([start], count, device),
            past_key_values=batch.cache,
            use_cache=True,
            **extra,
        )
    batch.mask = mask
    return out.logits[0, -count:, :].float()


def accept_greedy(request: Request, proposals: list[int], rows: torch.Tensor) -> tuple[int, int]:
    """(proposals kept, the model's own next token): the model's choice after each kept prefix, as
    its sampler makes it alone (repetition penalty included), until one differs."""
    assert request.sampler is not None
    context = list(request.ids)
    for place, row in enumerate(rows):
        token = request.sampler.next_token(context, row)
        if place == len(proposals) or token != proposals[place]:
            return place, token
        context.append(token)
    raise AssertionError("a verification pass has one row more than its proposals")


def accept_sampled(
    p_rows: Sequence[torch.Tensor],
    q_rows: Sequence[torch.Tensor | None],
    proposals: Sequence[int],
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """(proposals kept, the next token) by the speculative sampling rule: proposal i is kept with
    probability min(1, p_i(d) / q_i(d)); the first rejected one is replaced by a draw from
    norm(max(0, p_i - q_i)); when all are kept, a bonus token is drawn from the last row's p. Each
    token so sent is distributed as p. ``p_rows`` has one row more than the proposals; a q row over
    another vocabulary size is cut or padded with zeros to p's (tokens p lacks are never kept)."""
    import torch

    for place, token in enumerate(proposals):
        p = p_rows[place]
        q = _aligned(q_rows[place], p)
        draw = torch.rand((), generator=generator, device=generator.device if generator else p.device)
        if q[token] > 0 and draw * q[token] < p[token]:
            continue
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        residual = residual / total if total > 0 else p
        return place, int(torch.multinomial(residual, 1, generator=generator))
    return len(proposals), int(torch.multinomial(p_rows[-1], 1, generator=generator))


def probabilities(processors: Any, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """The distribution a reply samples its next token from after ``ids``: its processors
    (repetition penalty, temperature, top-k, top-p) on ``logits``, then softmax, as the sampler does."""
    import torch

    scores = processors(torch.tensor([ids], dtype=torch.long, device=logits.device), logits.unsqueeze(0))
    return torch.softmax(scores, dim=-1)[0]


def crop(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of every layer of a (dynamic) cache."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def _aligned(q: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    """``q`` on ``p``'s device and vocabulary size (cut, or padded with zeros)."""
    import torch

    assert q is not None, "sampling needs the draft's distributions"
    q = q.to(p.device)
    if q.shape[0] >= p.shape[0]:
        return q[: p.shape[0]]
    return torch.cat([q, q.new_zeros(p.shape[0] - q.shape[0])])


def _generator(request: Request, device: Any) -> torch.Generator:
    """The reply's own generator (its seed), made here when its first token did not make one."""
    import torch

    sampler = request.sampler
    assert sampler is not None
    if sampler.generator is None:
        seed = sampler.params.seed if sampler.params.seed is not None else secrets.randbits(32)
        sampler.generator = torch.Generator(device=device).manual_seed(seed)
    return sampler.generator


def _draft_seed(request: Request) -> int:
    """The draft's draws: seeded from the reply's seed, so a seeded reply is reproducible."""
    sampler = request.sampler
    assert sampler is not None
    if sampler.generator is not None:
        return (sampler.generator.initial_seed() + 1) % 2**63
    return secrets.randbits(32) if sampler.params.seed is None else sampler.params.seed + 1
