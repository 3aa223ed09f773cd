"""Generation: parameter validation, chat prompt layout, stop strings, and streaming on a real
(tiny, random) model: determinism, accumulation, stats, Stop, a consumer that goes away."""

from __future__ import annotations

import itertools
import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from optdemo.config import LoadConfig
from optdemo.errors import GenerationError
from optdemo.generation import (
    CHAT_PREAMBLE,
    CHAT_STOP_STRINGS,
    MAX_NEW_TOKENS_LIMIT,
    GenerationParams,
    GenerationStats,
    GenerationUpdate,
    _cut_at_stop,
    build_chat_prompt,
    context_window,
    stream_generate,
)

# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("max_new_tokens", 0, "max_new_tokens must be between 1 and 4096, got 0"),
        ("max_new_tokens", -1, "max_new_tokens must be between 1 and 4096, got -1"),
        ("max_new_tokens", 10**9, "max_new_tokens must be between 1 and 4096"),
        ("max_new_tokens", MAX_NEW_TOKENS_LIMIT + 1, "max_new_tokens must be between"),
        ("max_new_tokens", "abc", "max_new_tokens must be a whole number"),
        ("max_new_tokens", True, "max_new_tokens must be a whole number, not True"),
        ("max_new_tokens", 3.5, "max_new_tokens must be a whole number"),
        ("max_new_tokens", None, "max_new_tokens must be a whole number"),
        ("max_new_tokens", float("nan"), "max_new_tokens must be a whole number"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("temperature", float("inf"), "temperature must be a finite number"),
        ("temperature", -1, "temperature must be between 0 (greedy) and 5, got -1"),
        ("temperature", 5.5, "temperature must be between 0 (greedy) and 5"),
        ("temperature", "x", "temperature must be a number"),
        ("temperature", None, "temperature must be a number"),
        ("temperature", False, "temperature must be a number, not False"),
        ("top_p", 0, "top_p must be in (0, 1], got 0"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_p", "-inf", "top_p must be a finite number"),
        ("top_k", -1, "top_k must be between 0 (off) and 100000, got -1"),
        ("top_k", 0.5, "top_k must be a whole number"),
        ("repetition_penalty", 0, "repetition_penalty must be between 0.5 and 5"),
        ("repetition_penalty", 6, "repetition_penalty must be between 0.5 and 5"),
        ("seed", -1, "seed must be between 0 and 4294967295"),
        ("seed", 2**32, "seed must be between 0 and 4294967295"),
        ("seed", "lucky", "seed must be a whole number"),
    ],
)
def test_invalid_params(field: str, value, fragment: str) -> None:
    with pytest.raises(GenerationError) as info:
        GenerationParams(**{field: value})
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_valid_params_are_coerced() -> None:
    params = GenerationParams(
        max_new_tokens=" 12 ", temperature="0.5", top_p="1", top_k="5", repetition_penalty=1, seed="7"
    )
    assert (params.max_new_tokens, params.top_k, params.seed) == (12, 5, 7)
    assert all(type(v) is int for v in (params.max_new_tokens, params.top_k, params.seed))
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.5, 1.0, 1.0)
    assert all(type(v) is float for v in (params.temperature, params.top_p, params.repetition_penalty))
    assert GenerationParams(max_new_tokens=12.0).max_new_tokens == 12  # what a number box sends
    assert GenerationParams(max_new_tokens=MAX_NEW_TOKENS_LIMIT).max_new_tokens == 4096
    assert GenerationParams(seed=None).seed is None
    assert GenerationParams(seed=0).seed == 0


def test_generate_kwargs() -> None:
    greedy = GenerationParams(max_new_tokens=5, temperature=0, repetition_penalty=1.2)
    assert greedy.generate_kwargs() == {
        "max_new_tokens": 5,
        "repetition_penalty": 1.2,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    sampled = GenerationParams(max_new_tokens=5, temperature=0.8, top_p=0.9, top_k=40)
    assert sampled.generate_kwargs() == {
        "max_new_tokens": 5,
        "repetition_penalty": 1.1,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 40,
    }


def test_stats_summary() -> None:
    stats = GenerationStats(10, 24, 0.41, 2.0, 12.34, stopped=True)
    assert stats.summary() == "24 tokens · first token 0.41 s · 12.3 tokens/s · 2.00 s total · stopped"
    assert GenerationStats(3, 1, None, 0.5, None).summary() == "1 token · 0.50 s total"
    assert GenerationUpdate("x").done is False
    assert GenerationUpdate("x", stats).done is True


def test_context_window() -> None:
    def fake(**fields):
        return SimpleNamespace(config=SimpleNamespace(**fields))

    assert context_window(fake(max_position_embeddings=512)) == 512
    assert context_window(fake(n_positions=1024)) == 1024
    assert context_window(fake(max_position_embeddings=None, seq_length=77)) == 77
    assert context_window(fake()) == 2048


# ---------------------------------------------------------------- chat prompt layout


def words(text: str) -> int:
    return len(text.split())


def test_chat_prompt_layout() -> None:
    history = [("Hi ", " Hello! "), ("How are you?", "Fine.")]
    prompt = build_chat_prompt(history, "  And you? ", words, 10_000)
    assert prompt.dropped_turns == 0
    assert prompt.text == (
        CHAT_PREAMBLE + "User: Hi\nAssistant: Hello!\n"
        "User: How are you?\nAssistant: Fine.\n"
        "User: And you?\nAssistant:"
    )
    assert prompt.text.endswith("Assistant:")
    assert build_chat_prompt([], "Hi", words, 10_000).text == CHAT_PREAMBLE + "User: Hi\nAssistant:"


def test_chat_prompt_drops_oldest_turns_first() -> None:
    history = [("one one one", "uno"), ("two two", "dos"), ("three", "tres")]
    base = words(CHAT_PREAMBLE + "User: now\nAssistant:")
    turn_words = [words(f"User: {u}\nAssistant: {a}\n") for u, a in history]  # 6, 5, 4
    # Room for the last two turns only.
    prompt = build_chat_prompt(history, "now", words, base + turn_words[1] + turn_words[2])
    assert prompt.dropped_turns == 1
    assert "one" not in prompt.text and "two two" in prompt.text and "three" in prompt.text
    # Room for the last turn only, one word short of two.
    prompt = build_chat_prompt(history, "now", words, base + turn_words[1] + turn_words[2] - 1)
    assert prompt.dropped_turns == 2
    assert prompt.text == CHAT_PREAMBLE + "User: three\nAssistant: tres\nUser: now\nAssistant:"
    # Room for the message alone.
    prompt = build_chat_prompt(history, "now", words, base)
    assert prompt.dropped_turns == 3
    assert prompt.text == CHAT_PREAMBLE + "User: now\nAssistant:"


def test_chat_prompt_message_too_long() -> None:
    base = words(CHAT_PREAMBLE + "User: now\nAssistant:")
    with pytest.raises(GenerationError, match="the message is too long for the model's context") as info:
        build_chat_prompt([("a", "b")], "now", words, base - 1)
    assert f"with only {base - 1} available" in str(info.value)


# ---------------------------------------------------------------- stop strings


def test_cut_at_stop() -> None:
    stops = CHAT_STOP_STRINGS
    assert stops == ("\nUser:", "\nAssistant:")
    assert _cut_at_stop("Paris.\nUser: and", stops) == ("Paris.", True)
    assert _cut_at_stop("Paris.  \nAssistant: x", stops) == ("Paris.", True)
    assert _cut_at_stop("Paris.\nUs", stops) == ("Paris.", False)  # held back while streaming
    assert _cut_at_stop("Paris.\nAssist", stops) == ("Paris.", False)
    assert _cut_at_stop("Paris.\n", stops) == ("Paris.", False)
    assert _cut_at_stop("Paris.\nUs", stops, final=True) == ("Paris.\nUs", False)
    assert _cut_at_stop("Paris. \n", stops, final=True) == ("Paris.", False)
    assert _cut_at_stop("Users: many", stops) == ("Users: many", False)
    assert _cut_at_stop("no stops \n", ()) == ("no stops \n", False)
    assert _cut_at_stop("no stops \n", (), final=True) == ("no stops \n", False)


# ---------------------------------------------------------------- without a model


def test_no_model_loaded(manager) -> None:
    with pytest.raises(GenerationError, match="no model is loaded"):
        next(manager.stream_completion("Hello", GenerationParams()))
    with pytest.raises(GenerationError, match="no model is loaded"):
        next(manager.stream_chat([], "Hello", GenerationParams()))


@pytest.mark.slow
def test_generate_failure_becomes_generation_error(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    class Broken:
        config = SimpleNamespace(max_position_embeddings=512)

        def generate(self, **kwargs):
            raise RuntimeError("boom")

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with pytest.raises(GenerationError, match="generation failed: RuntimeError: boom"):
        list(stream_generate(Broken(), tokenizer, "Hello", GenerationParams(max_new_tokens=4)))
    assert not worker_threads()


class Scripted:
    """A stand-in model whose generate() streams a fixed reply token by token."""

    config = SimpleNamespace(max_position_embeddings=512)

    def __init__(self, tokenizer, reply: str) -> None:
        self.reply_ids = tokenizer(reply, add_special_tokens=False).input_ids

    def generate(self, input_ids, streamer, **kwargs) -> None:
        import torch

        streamer.put(input_ids)
        for token in self.reply_ids:
            streamer.put(torch.tensor([token]))
        streamer.end()


@pytest.mark.slow
def test_stream_cuts_at_a_stop_string_and_never_shows_part_of_it(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    reply = "Paris is the capital of France.\nUser: and the next turn\nAssistant: more"
    model = Scripted(tokenizer, reply)
    stop = threading.Event()
    updates = list(
        stream_generate(
            model,
            tokenizer,
            "User: capital?\nAssistant:",
            GenerationParams(max_new_tokens=100),
            stop_event=stop,
            stop_strings=CHAT_STOP_STRINGS,
        )
    )
    assert updates[-1].text == "Paris is the capital of France."
    for update in updates:
        assert "User" not in update.text
        assert not update.text.endswith("\n")
        assert "Paris is the capital of France.".startswith(update.text.rstrip())
    stats = updates[-1].stats
    assert stats.stopped is False  # ended by the stop string, not by the user
    assert 1 <= stats.new_tokens <= len(model.reply_ids)
    assert stop.is_set()
    assert not wait_for_no_workers()


@pytest.mark.slow
def test_stream_without_stop_strings_keeps_everything(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    reply = "Paris is the capital.\nUser: next "
    model = Scripted(tokenizer, reply)
    updates = list(stream_generate(model, tokenizer, "Hi", GenerationParams(max_new_tokens=100)))
    assert updates[-1].text == reply
    assert updates[-1].stats.new_tokens == len(model.reply_ids)
    assert updates[-1].stats.prompt_tokens == len(tokenizer("Hi").input_ids)
    texts = [u.text for u in updates]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))


# ---------------------------------------------------------------- streaming on the tiny model


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "optdemo-generate" and t.is_alive()]


def wait_for_no_workers(seconds: float = 2.0) -> list[threading.Thread]:
    deadline = time.monotonic() + seconds
    while worker_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return worker_threads()


@pytest.fixture
def loaded(manager, tiny_model_dir: Path):
    manager.load(LoadConfig(str(tiny_model_dir)))
    return manager


# A strong repetition penalty keeps the random model's greedy output varied (words, spaces), so
# the streamer has word boundaries to flush at.
GREEDY = GenerationParams(max_new_tokens=48, temperature=0, repetition_penalty=2.0)


@pytest.mark.slow
def test_greedy_completion_streams_and_is_deterministic(loaded) -> None:
    import torch

    prompt = "The quick brown fox"
    first = list(loaded.stream_completion(prompt, GREEDY))
    second = list(loaded.stream_completion(prompt, GREEDY))
    assert [u.text for u in first] == [u.text for u in second]
    texts = [u.text for u in first]
    assert len(set(texts)) > 1, "the reply arrived in one piece, not streamed"
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before)
    assert all(u.stats is None for u in first[:-1])
    stats = first[-1].stats
    model, tokenizer = loaded._loaded.model, loaded._loaded.tokenizer
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert stats.prompt_tokens == ids.shape[1] == len(tokenizer(prompt).input_ids)
    assert stats.truncated_prompt_tokens == 0
    assert stats.stopped is False
    assert stats.time_to_first_token > 0
    assert stats.tokens_per_second > 0
    assert stats.total_seconds >= stats.time_to_first_token
    # The same call made directly: same tokens, same text.
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pad_token_id=tokenizer.pad_token_id,
            **GREEDY.generate_kwargs(),
        )
    new = out[0, ids.shape[1] :]
    assert stats.new_tokens == len(new) <= GREEDY.max_new_tokens
    if tokenizer.eos_token_id not in new.tolist():
        assert stats.new_tokens == GREEDY.max_new_tokens
    assert texts[-1] == tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(loaded) -> None:
    def sample(seed: int) -> str:
        params = GenerationParams(max_new_tokens=24, temperature=1.0, top_p=1.0, top_k=0, seed=seed)
        return list(loaded.stream_completion("Hello there", params))[-1].text

    assert sample(1) == sample(1)
    assert len({sample(seed) for seed in (1, 2, 3, 4)}) > 1


@pytest.mark.slow
def test_stop_event_ends_the_stream(loaded) -> None:
    stop = threading.Event()
    params = GenerationParams(max_new_tokens=400, temperature=1.0, seed=3)
    updates = []
    started = time.monotonic()
    set_at = None
    for update in loaded.stream_completion("Hello there", params, stop_event=stop):
        updates.append(update)
        if set_at is None:
            stop.set()
            set_at = time.monotonic()
    assert set_at is not None
    assert time.monotonic() - set_at < 2.0
    stats = updates[-1].stats
    assert stats.stopped is True
    assert 1 <= stats.new_tokens < 400
    assert stats.total_seconds <= time.monotonic() - started
    assert not wait_for_no_workers()
    assert loaded.status().busy is None


@pytest.mark.slow
def test_consumer_going_away_stops_the_worker(loaded) -> None:
    params = GenerationParams(max_new_tokens=400, temperature=1.0, seed=3)
    stream = loaded.stream_completion("Hello there", params)
    first = next(stream)
    assert first.stats is None
    assert loaded.status().busy == "generating"
    stream.close()
    assert not wait_for_no_workers(), "a generation thread kept running for nobody"
    assert loaded.status().busy is None
    # The model lock was released: another generation starts at once.
    started = time.monotonic()
    done = list(loaded.stream_completion("Hi", GenerationParams(max_new_tokens=4, temperature=0)))
    assert time.monotonic() - started < 5
    assert done[-1].stats.new_tokens >= 1


@pytest.mark.slow
def test_long_prompt_is_truncated_from_the_left(loaded) -> None:
    tokenizer = loaded._loaded.tokenizer
    prompt = " ".join(f"word{i}" for i in range(900))
    total = len(tokenizer(prompt).input_ids)
    assert total > 512
    params = GenerationParams(max_new_tokens=16, temperature=0)
    stats = list(loaded.stream_completion(prompt, params))[-1].stats
    assert stats.prompt_tokens == 512 - 16
    assert stats.truncated_prompt_tokens == total - (512 - 16) > 0
    assert 1 <= stats.new_tokens <= 16


@pytest.mark.slow
def test_max_new_tokens_must_fit_the_context(loaded) -> None:
    with pytest.raises(GenerationError, match=r"must be smaller than the model's context window \(512"):
        list(loaded.stream_completion("Hi", GenerationParams(max_new_tokens=512)))
    assert loaded.status().busy is None
    assert list(loaded.stream_completion("Hi", GenerationParams(max_new_tokens=2)))[-1].done


@pytest.mark.slow
def test_prompt_checks(loaded) -> None:
    with pytest.raises(GenerationError, match="the prompt must be text"):
        list(loaded.stream_completion(None, GenerationParams(max_new_tokens=2)))  # type: ignore[arg-type]
    with pytest.raises(GenerationError, match="the limit is 100000"):
        list(loaded.stream_completion("x" * 100_001, GenerationParams(max_new_tokens=2)))


@pytest.mark.slow
def test_chat_reply_never_shows_the_next_turn(loaded) -> None:
    history = [("Hello, who are you?", "I am a small model."), ("What is the capital of France?", "Paris.")]
    for seed in range(3):
        params = GenerationParams(max_new_tokens=40, temperature=1.0, seed=seed)
        updates = list(loaded.stream_chat(history, "Tell me more.", params))
        assert updates[-1].stats is not None
        assert updates[-1].stats.new_tokens >= 1
        for update in updates:
            assert "User:" not in update.text
            assert "\nAssistant:" not in update.text
        assert updates[-1].text == updates[-1].text.rstrip()


@pytest.mark.slow
def test_chat_with_a_long_history_drops_old_turns(loaded) -> None:
    history = [(" ".join([f"question {i}"] * 10), " ".join([f"answer {i}"] * 10)) for i in range(40)]
    params = GenerationParams(max_new_tokens=16, temperature=0)
    stats = list(loaded.stream_chat(history, "last question", params))[-1].stats
    assert stats.truncated_prompt_tokens == 0  # old turns were dropped, not cut mid-way
    # The prompt is the newest turns that fit, in their order: laid out here independently.
    tokenizer = loaded._loaded.tokenizer

    def count(text: str) -> int:
        return len(tokenizer(text).input_ids)

    tail = "User: last question\nAssistant:"
    kept: list[str] = []
    for user, answer in reversed(history):
        turn = f"User: {user}\nAssistant: {answer}\n"
        if count(CHAT_PREAMBLE + turn + "".join(kept) + tail) > 512 - 16:
            break
        kept.insert(0, turn)
    assert 0 < len(kept) < len(history)
    assert stats.prompt_tokens == count(CHAT_PREAMBLE + "".join(kept) + tail)


@pytest.mark.slow
@pytest.mark.parametrize("message", ["", "   \n", None])
def test_chat_with_empty_message(loaded, message) -> None:
    with pytest.raises(GenerationError, match="the message is empty"):
        next(loaded.stream_chat([], message, GenerationParams()))


@pytest.mark.slow
def test_stats_rates_are_consistent(loaded) -> None:
    stats = list(loaded.stream_completion("Hello", GREEDY))[-1].stats
    assert math.isfinite(stats.tokens_per_second)
    assert 0 < stats.time_to_first_token <= stats.total_seconds
    assert stats.summary().startswith(f"{stats.new_tokens} tokens · first token ")
