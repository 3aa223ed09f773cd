"""Speculative decoding (issue #22): a draft proposes, one pass of the model verifies.

Greedy replies are token for token the model's own with any draft (its own 4bit and 8bit copies, a
second tiny checkpoint sharing the tokenizer) on every tier (RAM, the mapped and the streamed disk
tier, a quantized model, a random opt-350m in bfloat16); stop sequences and max_new_tokens end a
reply inside a kept run; sampled tokens follow the model's distribution; the draft length follows
the measured costs; and with two replies running there is no speculation.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import GPU_COUNT

from optdemo.core.budget import parse_max_memory
from optdemo.core.errors import ConfigError, LoadError
from optdemo.core.generation import GenerationParams, GenerationUpdate
from optdemo.core.load_config import LoadConfig
from optdemo.models.synthetic import TINY_OVERRIDES, build_random_opt
from optdemo.plan.bandwidth import Bandwidths
from optdemo.plan.planner import plan_device_map
from optdemo.plan.policy import DraftCosts, choose_draft_length, expected_tokens
from optdemo.plan.speed import predict_draft
from optdemo.runtime.batching import speculative
from optdemo.runtime.batching.request import Request
from optdemo.runtime.manager import ModelManager

pytestmark = pytest.mark.slow

PROMPTS = ("Hello there", "The quick brown fox", "Why is offloading slow when the weights live on disk?")
# A repetition penalty keeps the random model's greedy output varied.
GREEDY = GenerationParams(max_new_tokens=40, temperature=0, repetition_penalty=1.3)
SPLIT = "cpu=700KiB"  # the tiny model: embeddings and a layer in RAM, five layers on disk


@pytest.fixture(scope="module")
def draft_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny checkpoint, smaller (2 layers) and with other weights, with the same
    tokenizer: a draft that often disagrees with the model."""
    overrides = {**TINY_OVERRIDES, "num_hidden_layers": 2}
    return build_random_opt(
        tmp_path_factory.mktemp("draft"), "opt-125m", overrides=overrides, dtype="float32", seed=1
    )


def replies(manager: ModelManager, params: GenerationParams = GREEDY) -> list[GenerationUpdate]:
    """Each prompt's final update, one reply at a time (alone on the model)."""
    return [list(manager.stream_completion(prompt, params))[-1] for prompt in PROMPTS]


def tier_config(model: Path, where: str, tmp_path: Path) -> LoadConfig:
    """The tiny model in RAM, on a disk tier (mapped or streamed), or quantized."""
    if where == "ram":
        return LoadConfig(str(model))
    if where == "8bit model":
        return LoadConfig(str(model), quantization="8bit")
    mode = where.removeprefix("disk, ")
    budget = parse_max_memory(SPLIT)
    return LoadConfig(str(model), max_memory=budget, offload_folder=str(tmp_path), disk_tier=mode)


@pytest.mark.parametrize(
    ("where", "draft"),
    [
        ("ram", "4bit"),
        ("ram", "8bit"),
        ("ram", "model"),
        ("disk, map", "4bit"),
        ("disk, stream", "4bit"),
        ("disk, stream", "model"),
        ("8bit model", "4bit"),
    ],
)
def test_greedy_replies_are_the_models_own_with_a_draft(
    where: str, draft: str, manager: ModelManager, tiny_model_dir: Path, draft_model_dir: Path, tmp_path: Path
) -> None:
    """The same tokens with and without a draft, at every draft length (1, 3, 8 and the one the
    costs choose), wherever the model's weights are; the draft's proposals were checked and kept."""
    if where == "8bit model" and GPU_COUNT:
        pytest.skip("optdemo's CPU quantization (with a GPU, bitsandbytes quantizes)")
    config = tier_config(tiny_model_dir, where, tmp_path)
    manager.load(config)
    reference = [update.token_ids for update in replies(manager)]
    assert all(len(ids) == GREEDY.max_new_tokens for ids in reference)
    report = manager.load(config.with_changes(draft=str(draft_model_dir) if draft == "model" else draft))
    assert report.status == "loaded"  # the draft is part of the configuration: a new load
    if where.startswith("disk"):
        assert report.disk_tier is not None and report.disk_tier.choice.startswith(where[6:])
    for fixed in (1, 3, 8, None):
        manager.engine.speculator.fixed_k = fixed
        updates = replies(manager)
        assert [u.token_ids for u in updates] == reference, fixed
        stats = [u.stats for u in updates]
        if fixed is not None:
            assert all(s.passes > 0 and s.drafted == sum(s.draft_lengths) for s in stats)
            assert all(max(s.draft_lengths) <= fixed for s in stats)
            # Every pass sends its kept proposals and one token of the model's own.
            assert all(s.accepted + s.passes <= s.new_tokens - 1 for s in stats)
            if draft != "model":  # the model's own copy agrees with it most of the time
                assert sum(s.accepted for s in stats) > sum(s.drafted for s in stats) / 2


def test_a_random_opt_350m_in_bfloat16_is_the_same_with_its_4bit_draft(
    manager: ModelManager, tmp_path: Path
) -> None:
    """opt-350m's real architecture (post-LayerNorm, projected embeddings), random weights in
    bfloat16, whose one-row products round apart from several rows' unless padded: the same tokens
    with its 4bit copy drafting 4 tokens a pass."""
    model = build_random_opt(tmp_path / "opt-350m", "opt-350m", dtype="bfloat16")
    params = GenerationParams(max_new_tokens=12, temperature=0, repetition_penalty=1.3)
    manager.load(LoadConfig(str(model)))
    reference = list(manager.stream_completion(PROMPTS[1], params))[-1]
    manager.load(LoadConfig(str(model), draft="4bit"))
    manager.engine.speculator.fixed_k = 4
    update = list(manager.stream_completion(PROMPTS[1], params))[-1]
    assert update.token_ids == reference.token_ids and len(update.token_ids) == 12
    assert update.stats.passes > 0 and update.stats.accepted > 0


def test_stop_sequences_and_max_new_tokens_end_a_reply_inside_a_kept_run(
    manager: ModelManager, tiny_model_dir: Path
) -> None:
    """With 8 proposals a pass, the reply still ends exactly where the model's own ends: at a stop
    sequence taken from the middle of its reply, and at max_new_tokens (not a multiple of 9)."""
    manager.load(LoadConfig(str(tiny_model_dir)))
    whole = list(manager.stream_completion(PROMPTS[0], GREEDY))[-1]
    stop = whole.text[len(whole.text) // 2 :][:3]
    assert stop.strip()
    stopped = GenerationParams(max_new_tokens=40, temperature=0, repetition_penalty=1.3, stop=(stop,))
    short = GenerationParams(max_new_tokens=13, temperature=0, repetition_penalty=1.3)
    references = [list(manager.stream_completion(PROMPTS[0], p))[-1] for p in (stopped, short)]
    manager.load(LoadConfig(str(tiny_model_dir), draft="8bit"))
    manager.engine.speculator.fixed_k = 8
    for params, reference in zip((stopped, short), references, strict=True):
        updates = list(manager.stream_completion(PROMPTS[0], params))
        final = updates[-1]
        assert (final.text, final.token_ids) == (reference.text, reference.token_ids)
        assert final.stats.passes > 0
        assert all(stop not in u.text for u in updates) or params is short
    assert len(final.token_ids) == 13
    assert whole.text.startswith(references[0].text) and len(references[0].token_ids) < 40


def test_the_end_of_text_and_stop_end_a_reply_inside_a_kept_run(
    manager: ModelManager, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token of the model's reply made its end-of-text token: with 8 proposals a pass the reply
    ends at its first occurrence, as without a draft; Stop pressed after the 5th token: no 6th."""
    from optdemo.runtime.batching.scheduler import BatchEngine

    model = tmp_path / "eos"
    shutil.copytree(tiny_model_dir, model)
    manager.load(LoadConfig(str(model)))
    whole = list(manager.stream_completion(PROMPTS[0], GREEDY))[-1].token_ids
    eos = next(token for index, token in enumerate(whole) if index >= 6 and token not in whole[:index])
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    manager.unload()
    manager.load(LoadConfig(str(model)))
    ended = list(manager.stream_completion(PROMPTS[0], GREEDY))[-1].token_ids
    assert ended == whole[: whole.index(eos) + 1]
    manager.load(LoadConfig(str(model), draft="8bit"))
    manager.engine.speculator.fixed_k = 8
    update = list(manager.stream_completion(PROMPTS[0], GREEDY))[-1]
    assert update.token_ids == ended and update.stats.passes > 0
    emit = BatchEngine._emit

    def stop_after_five(self, loaded, request, token) -> None:
        emit(self, loaded, request, token)
        if request.generated == 5:
            request.stop_event.set()  # what Stop does, between two tokens of a kept run

    monkeypatch.setattr(BatchEngine, "_emit", stop_after_five)
    stopped = list(manager.stream_completion(PROMPTS[0], GREEDY))[-1]
    assert stopped.token_ids == ended[:5] and stopped.stats.stopped is True


# ---------------------------------------------------------------------------------- sampling
def chi_square_quantile(degrees: int, z: float = 3.09) -> float:
    """The chi-square distribution's 0.999 quantile (``z``: the normal's), by Wilson and Hilferty's
    approximation (within 1% from 3 degrees of freedom on)."""
    k = float(degrees)
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def _chi_square(counts: Counter, probabilities: dict[int, float], draws: int) -> float:
    return sum((counts[token] - draws * p) ** 2 / (draws * p) for token, p in probabilities.items() if p > 0)


def test_the_sampling_rule_sends_tokens_distributed_as_the_models() -> None:
    """On hand-made distributions: the model's p, a draft's q that differs (mass where p has none,
    none where p has some): the first token sent is distributed as p, whether the proposal is kept
    or replaced; with q = p every proposal is kept and the bonus token follows p too."""
    p = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05, 0.00])
    q = torch.tensor([0.10, 0.30, 0.00, 0.20, 0.15, 0.25])
    generator, draws = torch.Generator().manual_seed(0), 20000
    drafts = torch.multinomial(q, draws, replacement=True, generator=generator).tolist()
    first = Counter()
    for proposal in drafts:
        kept, token = speculative.accept_sampled([p, p], [q], [proposal], generator)
        first[proposal if kept else token] += 1
    expected = dict(enumerate(p.tolist()))
    assert first[5] == 0  # p gives it nothing: never sent, however often proposed
    assert _chi_square(first, expected, draws) < chi_square_quantile(4)
    kept_all, bonus = Counter(), Counter()
    for _ in range(4000):
        proposal = int(torch.multinomial(p, 1, generator=generator))
        kept, token = speculative.accept_sampled([p, p], [p], [proposal], generator)
        kept_all[kept] += 1
        bonus[token] += 1
    assert kept_all == {1: 4000}
    assert _chi_square(bonus, expected, 4000) < chi_square_quantile(4)
    # A draft over a smaller vocabulary is padded with zeros: a replacement never comes from where
    # the draft put its mass, and never is a token p lacks.
    short_q = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    for _ in range(200):
        kept, token = speculative.accept_sampled([p, p], [short_q], [4], generator)
        assert token != 5 and (kept == 1 or token < 4)


def test_sampled_replies_follow_the_models_distribution(manager: ModelManager, tiny_model_dir: Path) -> None:
    """End to end, 300 seeds: three tokens sampled (top-3, temperature 1) with the model's 4bit
    copy drafting (its top 3 overlap the model's but differ: some proposals are kept, others
    replaced from norm(max(0, p - q)), which differs from p here) are distributed as the model's
    own joint distribution of the three, computed here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = [
        GenerationParams(
            max_new_tokens=3, temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0, seed=s
        )
        for s in range(300)
    ]
    manager.load(LoadConfig(str(tiny_model_dir), draft="4bit"))
    manager.engine.speculator.fixed_k = 2
    updates = [list(manager.stream_completion(PROMPTS[1], p))[-1] for p in params]
    # Every reply but the first speculates (the first's two steps warm up and time a one-token pass).
    assert sum(u.stats.passes for u in updates) == 299 and sum(u.stats.accepted for u in updates) > 0
    assert any(u.stats.accepted < u.stats.drafted for u in updates)  # rejections happened
    prompt_ids = list(AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPTS[1]).input_ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def top3(ids: list[int]) -> dict[int, float]:
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, -1]
        values, tokens = logits.topk(3)
        return dict(zip(tokens.tolist(), torch.softmax(values, -1).tolist(), strict=True))

    joint: dict[tuple[int, ...], float] = {}
    for a, pa in top3(prompt_ids).items():
        for b, pb in top3([*prompt_ids, a]).items():
            for c, pc in top3([*prompt_ids, a, b]).items():
                joint[(a, b, c)] = pa * pb * pc
    seen = Counter(tuple(u.token_ids) for u in updates)
    assert set(seen) <= set(joint)
    pairs: dict[tuple[int, ...], float] = Counter()
    for (a, b, _), probability in joint.items():
        pairs[(a, b)] += probability
    # The first two tokens (the second one is the speculative pass's: a kept proposal or its
    # replacement), then all three (the third may be the bonus token).
    for expected, observed in ((pairs, Counter(ids[:2] for ids in seen.elements())), (joint, seen)):
        statistic, degrees = _pooled_chi_square(observed, expected, len(updates))
        assert statistic < chi_square_quantile(degrees), (statistic, degrees)


def _pooled_chi_square(observed: Counter, expected: dict, draws: int) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, cells expected fewer than 5 times pooled."""
    small = [cell for cell, p in expected.items() if draws * p < 5]
    cells = {cell: p for cell, p in expected.items() if cell not in small}
    counts = {cell: observed[cell] for cell in cells}
    if small:
        cells["rest"] = sum(expected[cell] for cell in small)
        counts["rest"] = sum(observed[cell] for cell in small)
    statistic = sum((counts[cell] - draws * p) ** 2 / (draws * p) for cell, p in cells.items())
    return statistic, len(cells) - 1


# ---------------------------------------------------------------------------------- the draft length
def test_the_draft_length_follows_the_costs() -> None:
    """Where a pass over more tokens costs about the same (a disk tier) k is long and pays; where
    each further token costs a pass (RAM on a CPU) k is 0; higher acceptance, longer k."""
    disk = DraftCosts(one_pass=1.0, per_extra_token=0.02, draft_token=0.05)
    ram = DraftCosts(one_pass=0.01, per_extra_token=0.01, draft_token=0.004)
    k_low, rate_low = choose_draft_length(disk, 0.5)
    k_high, rate_high = choose_draft_length(disk, 0.9)
    assert 0 < k_low < k_high <= 8 and rate_high > rate_low > 1.0 * 1.05
    assert rate_high == pytest.approx(expected_tokens(0.9, k_high) / disk.pass_seconds(k_high))
    assert choose_draft_length(ram, 0.9) == (0, 100.0)
    assert choose_draft_length(disk, 0.9, max_k=2)[0] == 2
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0


def test_the_engine_measures_before_it_speculates_then_chooses_by_the_costs() -> None:
    """A fresh model: plain passes first (a warm-up, then its cost), then a pass of EXPLORE_K (a longer pass's
    and the draft's costs), then the rule's k at this reply's acceptance; never past the reply's
    last token nor the draft's window; a plain pass now and then."""
    chooser = speculative.Speculator()
    request = Request(lambda loaded: None, GenerationParams(max_new_tokens=40), threading.Event())
    request.ids, request.generated = [1, 2, 3], 1
    assert chooser.choose_k(request, window=512) == 0
    chooser._measure_pass(1, 9.0)  # the first pass warms up (kernel probes, cold caches): not counted
    assert chooser.measured.one_pass is None and chooser.choose_k(request, window=512) == 0
    chooser._measure_pass(1, 1.0)
    assert chooser.choose_k(request, window=512) == speculative.EXPLORE_K
    chooser._measure_pass(4, 1.06)
    chooser.measured.draft_token = 0.05
    assert chooser.measured.per_extra_token == pytest.approx(0.02)
    costs = chooser.measured.costs()
    expected = choose_draft_length(costs, chooser.acceptance(request))[0]
    assert chooser.choose_k(request, window=512) == expected > 0
    request.generated = 38  # two tokens left: one proposal, then the model's own token
    assert chooser.choose_k(request, window=512) == 1
    request.generated = 1
    assert chooser.choose_k(request, window=5) == 2  # the draft sees positions up to 4
    for _ in range(speculative.REMEASURE_EVERY):
        chooser._measure_pass(5, 1.08)
    assert chooser.choose_k(request, window=512) == 0


def test_a_draft_that_cannot_pay_here_is_released(manager: ModelManager, tiny_model_dir: Path) -> None:
    """Costs under which no draft length pays even at 95% acceptance (each further token of a pass
    as dear as a whole pass): the draft is let go at the next step, with the reason, and the reply
    goes on plainly, token for token the model's own; a new load brings the draft back."""
    config = LoadConfig(str(tiny_model_dir))
    manager.load(config)
    reference = list(manager.stream_completion(PROMPTS[2], GREEDY))[-1].token_ids
    manager.load(config.with_changes(draft="4bit"))
    assert manager.draft_info is not None
    speculator = manager.engine.speculator
    speculator.fixed_k = None
    speculator._owner = manager._loaded  # as after the model's first pass: its costs are known
    speculator.measured = speculative.Measured(one_pass=0.1, per_extra_token=0.1, draft_token=0.05)
    update = list(manager.stream_completion(PROMPTS[2], GREEDY))[-1]
    assert update.token_ids == reference and update.stats.passes == 0
    assert manager.draft_info is None
    reason = speculator.measured.released
    assert "was released" in reason and "no acceptance rate" in reason
    manager.load(config)
    manager.load(config.with_changes(draft="4bit"))
    assert manager.draft_info is not None and speculator.measured.released is None


def test_the_plans_predicted_costs_stand_in_until_each_is_measured() -> None:
    """With the plan's prediction, the first speculative pass after the one-token pass is measured
    uses the rule's k by the predicted costs (no exploratory pass); each measurement then replaces
    its prediction; and a prediction under which nothing pays is known before any speculative pass."""
    chooser = speculative.Speculator()
    chooser.measured.predicted = DraftCosts(0.0, 0.02, 0.05)  # one_pass: measured, never predicted
    request = Request(lambda loaded: None, GenerationParams(max_new_tokens=40), threading.Event())
    request.ids, request.generated = [1, 2, 3], 1
    chooser._measure_pass(1, 9.0)  # the warm-up
    assert chooser.measured.costs() is None and chooser.choose_k(request, window=512) == 0
    chooser._measure_pass(1, 1.0)
    assert chooser.measured.costs() == DraftCosts(1.0, 0.02, 0.05)
    expected = choose_draft_length(DraftCosts(1.0, 0.02, 0.05), chooser.acceptance(request))[0]
    assert chooser.choose_k(request, window=512) == expected == 5  # not EXPLORE_K: no exploring
    chooser._measure_pass(4, 1.9)  # three further tokens cost 0.3 s each: measured, not predicted
    assert chooser.measured.costs() == DraftCosts(1.0, pytest.approx(0.3), 0.05)
    said = chooser.measured.describe(chooser.measured.costs())
    assert said == "a pass costs 1.00 s, each further token 0.30 s more and a draft token 0.05 s (predicted)"
    hopeless = speculative.Measured(one_pass=0.1, predicted=DraftCosts(0.0, 0.1, 0.05))
    assert choose_draft_length(hopeless.costs(), 0.95)[0] == 0


def test_a_draft_predicted_not_to_pay_is_released_before_any_speculative_pass(
    manager: ModelManager, tiny_model_dir: Path
) -> None:
    """The load gives the draft the plan's predicted costs; where they say no draft length pays,
    the draft goes after the first measured one-token pass: no speculative pass spent, the reply the
    model's own, the reason saying which costs were predicted."""
    config = LoadConfig(str(tiny_model_dir))
    manager.load(config)
    reference = list(manager.stream_completion(PROMPTS[2], GREEDY))[-1].token_ids
    manager.load(config.with_changes(draft="4bit"))
    predicted = manager._loaded.draft.predicted
    assert predicted is not None and predicted.per_extra_token > 0 and predicted.draft_token > 0
    assert predicted.drafting_slowdown == 1.0  # all in RAM: the draft takes no page cache it needs
    manager._loaded.draft.predicted = DraftCosts(0.0, 10.0, 1.0)  # as on a CPU without float16 units
    update = list(manager.stream_completion(PROMPTS[2], GREEDY))[-1]
    assert update.token_ids == reference and update.stats.passes == update.stats.drafted == 0
    assert manager.draft_info is None
    reason = manager.engine.speculator.measured.released
    assert (
        "each further token 10.00 s (predicted) more" in reason and "draft token 1.00 s (predicted)" in reason
    )


# ---------------------------------------------------------------------------------- other visitors
def test_two_replies_running_are_never_speculated(
    manager: ModelManager, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply alone speculates; when a second joins, every pass serves both in the batch (no
    speculative pass while two run) and both keep the tokens they get alone; the first speculates
    again once alone."""
    manager.load(LoadConfig(str(tiny_model_dir)))
    long = GenerationParams(max_new_tokens=120, temperature=0, repetition_penalty=1.3)
    alone = [list(manager.stream_completion(p, long))[-1].token_ids for p in PROMPTS[:2]]
    manager.load(LoadConfig(str(tiny_model_dir), draft="8bit"))
    manager.engine.speculator.fixed_k = 2
    list(manager.stream_completion(PROMPTS[2], GREEDY))  # a warm-up and a one-token pass timed
    running_at_passes: list[int] = []
    speculated = threading.Event()
    original = speculative.Speculator._pass

    def recording(self, loaded, request, batch, k, emit) -> None:
        running_at_passes.append(manager.engine.counts()[0])
        original(self, loaded, request, batch, k, emit)
        if k:
            speculated.set()

    monkeypatch.setattr(speculative.Speculator, "_pass", recording)
    results: dict[int, GenerationUpdate] = {}
    second = threading.Thread(
        target=lambda: results.__setitem__(1, list(manager.stream_completion(PROMPTS[1], long))[-1])
    )
    for update in manager.stream_completion(PROMPTS[0], long):
        if speculated.is_set() and second.ident is None:
            second.start()  # joins while the first is being written, after a speculative pass
        results[0] = update
    second.join(30)
    first, other = results[0], results[1]
    assert [first.token_ids, other.token_ids] == alone
    assert first.stats.batch_size == 2 and first.stats.passes > 0  # it ran alone, then shared
    assert set(running_at_passes) == {1}


# ---------------------------------------------------------------------------------- configuration
def test_a_draft_with_another_tokenizer_is_refused_before_anything_is_dropped(
    manager: ModelManager, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A draft model whose vocabulary differs is refused in one sentence, and the loaded model
    stays; one whose vocabulary size differs is blocked by the plan."""
    from transformers import AutoTokenizer

    other = build_random_opt(
        tmp_path / "other", "opt-125m", overrides=TINY_OVERRIDES, dtype="float32", seed=2
    )
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<other>"])
    tokenizer.save_pretrained(other)
    manager.load(LoadConfig(str(tiny_model_dir)))
    with pytest.raises(
        ConfigError, match=r"does not share .*'s tokenizer .*: choose a draft of the same family"
    ):
        manager.load(LoadConfig(str(tiny_model_dir), draft=str(other)))
    assert manager.current_config == LoadConfig(str(tiny_model_dir))
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    config = json.loads((other / "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps({**config, "vocab_size": 1024}))
    plan = plan_device_map(LoadConfig(str(tiny_model_dir), draft=str(bigger)))
    assert plan.blockers and "vocabulary of 1024 tokens and the model one of 512" in plan.blockers[0]
    with pytest.raises((LoadError, ConfigError)):
        manager.load(LoadConfig(str(tiny_model_dir), draft=str(bigger)))


def test_the_draft_in_the_configuration() -> None:
    """``draft`` is normalised and part of equality (another draft is another load); a copy in
    the scheme the model is loaded in is refused."""
    assert LoadConfig("tiny-opt", draft=" 4BIT ").draft == "4bit"
    assert LoadConfig("tiny-opt", draft="").draft == "none" == LoadConfig("tiny-opt").draft
    assert LoadConfig("tiny-opt", draft="opt-125m").draft_model == "facebook/opt-125m"
    assert LoadConfig("tiny-opt", draft="8bit").draft_model is None
    assert LoadConfig("tiny-opt", draft="4bit") != LoadConfig("tiny-opt")
    with pytest.raises(ConfigError, match="loaded 4bit already"):
        LoadConfig("tiny-opt", quantization="4bit", draft="4bit")
    with pytest.raises(ConfigError, match=r"draft model: model folder '\./nowhere' does not exist"):
        LoadConfig("tiny-opt", draft="./nowhere")


def test_the_plan_gives_the_drafts_memory_and_the_speed_with_and_without(tiny_model_dir: Path) -> None:
    """The 4bit copy's RAM is the quantized model's size; on a disk-bound plan the predicted speed
    with the draft beats plain decoding, more so at higher acceptance, by the engine's rule."""
    from transformers.integrations.accelerate import compute_module_sizes

    from optdemo.models.source import resolve_model
    from optdemo.plan.planner import meta_model

    config = LoadConfig(str(tiny_model_dir), draft="4bit")
    plan = plan_device_map(config)
    sizes, _ = compute_module_sizes(meta_model(resolve_model(config.model), torch.bfloat16, "4bit"))
    assert plan.draft is not None and plan.draft.bytes == sizes[""] < plan.total_bytes / 3
    name = f"{config.display_name}'s 4bit copy"
    assert plan.to_dict()["draft"] == {"draft": "4bit", "display_name": name, "bytes": plan.draft.bytes}
    bandwidths = Bandwidths(
        {"float32": 1e10, "int4": 5e9, "int8": 8e9, "bfloat16": 8e9}, 1e9, prompt_matmul={"float32": 1e11}
    )
    # As if the model streamed from disk: one pass 1 s, far more than the draft's token.
    prediction = predict_draft(plan, bandwidths, one_pass=1.0)
    assert prediction is not None and prediction.plain_tokens_per_second == 1.0
    rates = [rate for _, _, rate in prediction.speculative]
    assert [a for a, _, _ in prediction.speculative] == [0.5, 0.7, 0.9]
    assert 1.0 < rates[0] < rates[1] < rates[2]
    assert all(k == choose_draft_length(prediction.costs, a)[0] for a, k, _ in prediction.speculative)
    assert "at acceptance 0.5 / 0.7 / 0.9" in prediction.summary()
    assert predict_draft(plan_device_map(LoadConfig(str(tiny_model_dir))), bandwidths, 1.0) is None


def test_the_plan_counts_the_drafts_ram_against_the_disk_tiers_page_cache(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With a disk tier, the draft's RAM comes out of the page cache that holds the tier: where the
    cache holds it either way, the prediction with the draft starts from the same plain pass; where
    only the draft's RAM makes the difference, a plain pass with it loaded is slower, and the plan
    says so beside the speed without it."""
    from optdemo.plan.policy import HEADROOM_BYTES
    from optdemo.plan.speed import predict_plan

    config = tier_config(tiny_model_dir, "disk, map", tmp_path).with_changes(draft="4bit")
    plan = plan_device_map(config)
    disk, cpu, draft = plan.bytes_per_device["disk"], plan.bytes_per_device["cpu"], plan.draft.bytes
    needed = cpu + disk + HEADROOM_BYTES  # the RAM that caches the whole tier beside the CPU tier
    roomy = predict_plan(plan, needed + 2 * draft).draft
    assert roomy.costs.one_pass == pytest.approx(1 / roomy.plain_tokens_per_second)
    assert roomy.costs.drafting_slowdown == 1.0 and "page cache" not in roomy.summary()
    tight = predict_plan(plan, needed + draft // 2).draft  # holds the tier only without the draft
    assert tight.costs.drafting_slowdown > 1.01
    assert tight.plain_tokens_per_second == pytest.approx(roomy.plain_tokens_per_second)
    said = "while it drafts, its RAM comes out of the disk tier's page cache: a pass of the model takes"
    assert said in tight.summary()
    # The engine's rule weighs that: a pass while drafting costs the slowdown times a plain one.
    costs = tight.costs
    assert costs.pass_seconds(0) == costs.one_pass
    assert costs.pass_seconds(2) == pytest.approx(
        2 * costs.draft_token + costs.one_pass * costs.drafting_slowdown + 2 * costs.per_extra_token
    )
    assert tight.to_dict()["drafting_slowdown"] == costs.drafting_slowdown


def test_a_slowdown_while_drafting_can_take_away_what_speculation_gains() -> None:
    """On a disk-bound pass (further tokens and draft tokens cheap) a draft kept half the time pays;
    the same costs with the model's pass 3x slower while drafting (the draft's RAM out of the page
    cache) do not, and the engine measures a further token beyond that slower pass."""
    disk = DraftCosts(1.0, 0.02, 0.05)
    assert choose_draft_length(disk, 0.5)[0] > 0
    assert choose_draft_length(DraftCosts(1.0, 0.02, 0.05, drafting_slowdown=3.0), 0.5)[0] == 0
    chooser = speculative.Speculator()
    chooser.measured.predicted = DraftCosts(0.0, 0.02, 0.05, drafting_slowdown=3.0)
    chooser._measure_pass(1, 9.0)  # the warm-up
    chooser._measure_pass(1, 1.0)
    chooser._measure_pass(3, 3.4)  # a 3-token pass while drafting: 3 s, then 0.2 s for each further
    assert chooser.measured.per_extra_token == pytest.approx(0.2)
    assert chooser.measured.costs() == DraftCosts(1.0, pytest.approx(0.2), 0.05, 3.0)
    said = chooser.measured.describe(chooser.measured.costs())
    assert said.startswith(
        "a pass costs 1.00 s (3x while drafting, predicted), each further token 0.20 s more"
    )


# ---------------------------------------------------------------------------------- where a user sets it
def test_the_draft_from_flags_and_environment() -> None:
    """``--draft`` and ``--draft-model`` (or OPTDEMO_DRAFT / OPTDEMO_DRAFT_MODEL) both set the
    draft the app starts with; both at once are refused in one sentence."""
    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings, parse_settings

    assert parse_settings([], env={}).draft == "none"
    assert parse_settings(["--draft", "4bit"], env={}).draft == "4bit"
    assert parse_settings([], env={"OPTDEMO_DRAFT": "8bit"}).draft == "8bit"
    assert parse_settings(["--draft-model", "opt-125m"], env={}).draft == "opt-125m"
    assert parse_settings([], env={"OPTDEMO_DRAFT_MODEL": "opt-125m"}).draft == "opt-125m"
    with pytest.raises(ConfigError, match="--draft and --draft-model both set the draft: give one of them"):
        parse_settings(["--draft", "4bit", "--draft-model", "opt-125m"], env={})
    with pytest.raises(ConfigError, match="--draft-model: draft model: model folder"):
        parse_settings(["--draft-model", "./nowhere/"], env={})
    service = DemoService(ModelManager(), AppSettings(draft="opt-125m"))
    assert service.initial_config().draft == "facebook/opt-125m"


def test_the_draft_in_the_configuration_tab_and_for_visitors() -> None:
    """The Draft dropdown and the model field make the configuration's draft, and the plan in the
    tab predicts the speed with it; in public mode a visitor may not name a draft model."""
    from app_fixtures import config_ui, form_values

    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings
    from optdemo.core.errors import AccessError
    from optdemo.web.tabs import config as config_tab

    service, tab = config_ui()
    assert tab.draft.value == "none" and tab.draft_model.value == ""
    request = None

    def as_form(**changes: object) -> LoadConfig:
        return config_tab.config_from_form(service, tab, form_values(tab, **changes), request)

    assert as_form(draft="4bit").draft == "4bit"
    assert as_form(draft="model", draft_model="opt-125m").draft == "facebook/opt-125m"
    assert as_form(draft="none", draft_model="opt-125m").draft == "none"  # the field counts for "model" only
    preview = config_tab.preview(service, tab, form_values(tab, draft="8bit"), request)
    view = preview[tab.plan_state]
    assert view.plan.draft is not None and view.prediction.draft is not None
    assert "at acceptance 0.5 / 0.7 / 0.9" in preview[tab.summary]
    public = DemoService(ModelManager(), AppSettings(lock_config=True, allow_models=("tiny-opt",)))
    assert public.make_config("tiny-opt", draft="4bit").draft == "4bit"
    with pytest.raises(AccessError, match="visitors cannot choose a draft model"):
        public.make_config("tiny-opt", draft="tiny-opt")


def test_generate_json_prints_one_object_with_the_drafts_figures(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """``python -m optdemo generate ... --json``: one JSON object, the same tokens with and without
    the draft, and with it the proposals, kept ones, passes, k of each pass and measured costs."""
    from optdemo.__main__ import main

    base = ["generate", str(tiny_model_dir), "--max-new-tokens", "12", "--json", "--prompt", PROMPTS[1]]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--draft", "8bit"]) == 0
    adaptive = json.loads(capsys.readouterr().out)  # speculates or not, as the costs say
    assert adaptive["token_ids"] == plain["token_ids"]
    assert main([*base, "--draft", "8bit", "--draft-length", "3"]) == 0
    drafted = json.loads(capsys.readouterr().out)
    assert drafted["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) == 12
    assert drafted["text"] == plain["text"] and drafted["draft"] == "8bit" and plain["draft"] == "none"
    for key in ("load_seconds", "time_to_first_token", "decode_seconds_per_token", "one_token_pass_seconds"):
        assert drafted[key] > 0, key
    assert drafted["passes"] == len(drafted["k_used"]) >= 1 and set(drafted["k_used"]) <= {1, 2, 3}
    assert drafted["k_pass_over_one_pass"] > 0 and drafted["draft_released"] is None
    assert drafted["drafted"] == sum(drafted["k_used"]) and 0 <= drafted["accepted"] <= drafted["drafted"]
    assert (plain["passes"], plain["k_used"], plain["acceptance"]) == (0, [], None)
    assert main([*base, "--draft", "4bit", "--draft-model", "tiny-opt"]) == 1
    assert "give one of them" in capsys.readouterr().err
    assert main([*base, "--draft-length", "3"]) == 1
    assert "--draft-length needs a draft" in capsys.readouterr().err
