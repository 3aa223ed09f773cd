"""Generation: parameter validation, chat prompt layout, stop strings, and streaming on a real
(tiny, random) model: determinism, accumulation, stats, Stop, a consumer that goes away."""

from __future__ import annotations

import copy
import itertools
import math
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from optdemo.core.chat_prompt import (
    CHAT_PREAMBLE,
    CHAT_STOP_STRINGS,
    PLAIN_FORMAT,
    TEMPLATE_FORMAT,
    build_chat_prompt,
    check_max_new_tokens,
    render_plain,
    template_renderer,
)
from optdemo.core.defaults import MAX_NEW_TOKENS_LIMIT
from optdemo.core.errors import GenerationError
from optdemo.core.generation import (
    GenerationParams,
    GenerationStats,
    GenerationUpdate,
    context_window,
    cut_at_stop,
)
from optdemo.core.load_config import LoadConfig

# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("max_new_tokens", 0, "max_new_tokens must be at least 1, got 0"),
        ("max_new_tokens", -1, "max_new_tokens must be at least 1, got -1"),
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
        ("stop", [1], "stop must be a list of texts"),
        ("stop", ["x"] * 9, "stop takes at most 8 sequences, got 9"),
        ("stop", ["x" * 201], "each stop sequence is at most 200 characters, got 201"),
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
    prompt = build_chat_prompt(history, "  And you? ", words, 10_000, 10)
    assert prompt.dropped_turns == 0
    assert prompt.text == (
        CHAT_PREAMBLE + "User: Hi\nAssistant: Hello!\n"
        "User: How are you?\nAssistant: Fine.\n"
        "User: And you?\nAssistant:"
    )
    assert prompt.prompt_tokens == words(prompt.text)
    assert build_chat_prompt([], "Hi", words, 10_000, 10).text == CHAT_PREAMBLE + "User: Hi\nAssistant:"
    # A system prompt replaces the default preamble.
    assert render_plain(" Be brief. ", [], "Hi") == "Be brief.\n\nUser: Hi\nAssistant:"


def test_chat_prompt_drops_oldest_turns_first() -> None:
    history = [("one one one", "uno"), ("two two", "dos"), ("three", "tres")]
    base = words(CHAT_PREAMBLE + "User: now\nAssistant:")
    turn_words = [words(f"User: {u}\nAssistant: {a}\n") for u, a in history]  # 6, 5, 4
    window = 1000
    # Room for the last two turns only.
    prompt = build_chat_prompt(history, "now", words, window, window - (base + turn_words[1] + turn_words[2]))
    assert prompt.dropped_turns == 1
    assert "one" not in prompt.text and "two two" in prompt.text and "three" in prompt.text
    # Room for the last turn only, one word short of two.
    reply = window - (base + turn_words[1] + turn_words[2] - 1)
    prompt = build_chat_prompt(history, "now", words, window, reply)
    assert prompt.dropped_turns == 2
    assert prompt.text == CHAT_PREAMBLE + "User: three\nAssistant: tres\nUser: now\nAssistant:"
    # Room for the message alone.
    prompt = build_chat_prompt(history, "now", words, window, window - base)
    assert prompt.dropped_turns == 3
    assert prompt.text == CHAT_PREAMBLE + "User: now\nAssistant:"
    assert prompt.prompt_tokens == base


def test_chat_prompt_states_the_max_new_tokens_rule() -> None:
    base = words(CHAT_PREAMBLE + "User: now\nAssistant:")
    with pytest.raises(GenerationError) as info:
        build_chat_prompt([("a", "b")], "now", words, 512, 512 - base + 1, cap=512)
    assert str(info.value) == (
        f"max_new_tokens is at most {512 - base} here: the model's 512-token window minus this "
        f"prompt's {base} tokens, and the operator's cap 512; you asked for {512 - base + 1}"
    )
    # The operator's cap is the bound when it is lower.
    with pytest.raises(GenerationError, match=r"max_new_tokens is at most 32 here: .* the operator's cap 32"):
        build_chat_prompt([], "now", words, 512, 33, cap=32)


def reference_layout(history, message, count, window, max_new_tokens, render=render_plain, system=""):
    """The prompt as optdemo laid it out before it counted turns: the whole conversation rendered
    and counted again for each number of dropped turns (quadratic), the first that fits wins."""
    for dropped in range(len(history) + 1):
        text = render(system, history[dropped:], message)
        if count(text) <= window - max_new_tokens:
            return text, dropped, count(text)
    raise AssertionError("the message alone does not fit")


class Counted:
    """A token counter that counts its own work: calls, and characters it was given."""

    def __init__(self, count) -> None:
        self.count, self.calls, self.chars = count, 0, 0

    def __call__(self, text: str) -> int:
        self.calls += 1
        self.chars += len(text)
        return self.count(text)


def test_chat_prompt_work_is_linear_in_the_history() -> None:
    """A long history costs what its kept turns cost: each turn is counted once, newest first, and
    the old turns that cannot fit are never rendered (it was one render of the whole rest per
    dropped turn: 400 turns here made 24 million characters of counting)."""
    history = [(f"question {i} " * 20, f"answer {i} " * 20) for i in range(400)]
    counted = Counted(words)
    prompt = build_chat_prompt(history, "now", counted, 1000, 600)
    assert (prompt.text, prompt.dropped_turns, prompt.prompt_tokens) == reference_layout(
        history, "now", words, 1000, 600
    )
    assert 0 < len(history) - prompt.dropped_turns < 10
    kept = len(history) - prompt.dropped_turns
    assert counted.calls <= kept + 8  # a turn each (and the one that did not fit), a few renders
    assert counted.chars <= 8 * len(prompt.text) + 400 * (kept + 2)


@pytest.mark.parametrize("seed", range(12))
def test_chat_prompt_keeps_the_whole_history_layout(seed: int) -> None:
    """Counting turn by turn drops exactly the turns the whole-conversation layout dropped."""
    rng = random.Random(seed)
    vocabulary = ["a", "bb", "ccc", "", " ", "\n", "tail  "]
    history = [
        (
            " ".join(rng.choices(vocabulary, k=rng.randrange(8))),
            " ".join(rng.choices(vocabulary, k=rng.randrange(8))),
        )
        for _ in range(rng.randrange(1, 30))
    ]
    base = words(render_plain("", [], "now"))
    for room in range(0, 60, 3):
        expected = reference_layout(history, "now", words, 1000, 1000 - base - room)
        prompt = build_chat_prompt(history, "now", words, 1000, 1000 - base - room)
        assert (prompt.text, prompt.dropped_turns, prompt.prompt_tokens) == expected


def numbered(system: str, turns, message: str) -> str:
    """A format whose turns cost more the later they stand (a numbered transcript): a turn counted
    alone costs less than it does in the conversation."""
    lines = [f"{'#' * (5 * index)} {user} / {bot}\n" for index, (user, bot) in enumerate(turns)]
    return system + "".join(lines) + message


def lonely(system: str, turns, message: str) -> str:
    """A format that says so when there is one turn only: a turn counted alone costs more."""
    header = "(a conversation of a single turn so far) " if len(turns) == 1 else ""
    return system + header + "".join(f"{user} / {bot}\n" for user, bot in turns) + message


@pytest.mark.parametrize("render", [numbered, lonely])
@pytest.mark.parametrize("seed", range(4))
def test_a_turn_estimate_that_is_off_is_corrected_by_a_bounded_search(render, seed: int) -> None:
    rng = random.Random(seed)
    history = [("x" * rng.randrange(40), "y" * rng.randrange(40)) for _ in range(rng.randrange(20, 60))]

    def chars(text: str) -> int:
        return len(text) // 3

    for reply in range(100, 1000, 45):
        counted = Counted(chars)
        prompt = build_chat_prompt(history, "now", counted, 1000, reply, render=render)
        expected = reference_layout(history, "now", chars, 1000, reply, render)
        assert (prompt.text, prompt.dropped_turns, prompt.prompt_tokens) == expected
        # A count per turn, then a galloping search: logarithmic in how far off the estimate was.
        assert counted.calls <= len(history) + 2 + 2 * math.ceil(math.log2(len(history) + 1)) + 2


def test_max_new_tokens_rule() -> None:
    check_max_new_tokens(500, 512, 12, 512)  # fits: 500 <= 512 - 12
    with pytest.raises(GenerationError) as info:
        check_max_new_tokens(10**9, 512, 12, 512)
    assert str(info.value) == (
        "max_new_tokens is at most 500 here: the model's 512-token window minus this prompt's 12 "
        "tokens, and the operator's cap 512; you asked for 1000000000"
    )
    # The engine's ceiling holds even where a deployment's cap is higher.
    with pytest.raises(GenerationError, match=f"the operator's cap {MAX_NEW_TOKENS_LIMIT}; "):
        check_max_new_tokens(MAX_NEW_TOKENS_LIMIT + 1, 100_000, 10, 10**6)
    with pytest.raises(GenerationError, match="this prompt's 600 tokens leave no room for a reply"):
        check_max_new_tokens(1, 512, 600, 512)


# ---------------------------------------------------------------- stop strings


def test_cut_at_stop() -> None:
    stops = CHAT_STOP_STRINGS
    assert stops == ("\nUser:", "\nAssistant:")
    assert cut_at_stop("Paris.\nUser: and", stops) == ("Paris.", True)
    assert cut_at_stop("Paris.  \nAssistant: x", stops) == ("Paris.", True)
    assert cut_at_stop("Paris.\nUs", stops) == ("Paris.", False)  # held back while streaming
    assert cut_at_stop("Paris.\nAssist", stops) == ("Paris.", False)
    assert cut_at_stop("Paris.\n", stops) == ("Paris.", False)
    assert cut_at_stop("Paris.\nUs", stops, final=True) == ("Paris.\nUs", False)
    assert cut_at_stop("Paris. \n", stops, final=True) == ("Paris.", False)
    assert cut_at_stop("Users: many", stops) == ("Users: many", False)
    assert cut_at_stop("no stops \n", ()) == ("no stops \n", False)
    assert cut_at_stop("no stops \n", (), final=True) == ("no stops \n", False)


# ---------------------------------------------------------------- without a model


def test_no_model_loaded(manager) -> None:
    with pytest.raises(GenerationError, match="no model is loaded"):
        next(manager.stream_completion("Hello", GenerationParams()))
    with pytest.raises(GenerationError, match="no model is loaded"):
        next(manager.stream_chat([], "Hello", GenerationParams()))


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
    assert stats.dropped_turns == 0 and stats.context_window == 512
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
            max_new_tokens=GREEDY.max_new_tokens,
            repetition_penalty=GREEDY.repetition_penalty,
            do_sample=False,
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
def test_a_prompt_longer_than_the_window_is_refused_with_the_rule(loaded) -> None:
    tokenizer = loaded._loaded.tokenizer
    prompt = " ".join(f"word{i}" for i in range(900))
    total = len(tokenizer(prompt).input_ids)
    assert total > 512
    with pytest.raises(GenerationError, match=f"this prompt's {total} tokens leave no room for a reply"):
        list(loaded.stream_completion(prompt, GenerationParams(max_new_tokens=16, temperature=0)))
    assert loaded.status().busy is None


@pytest.mark.slow
def test_max_new_tokens_must_fit_the_window_minus_the_prompt(loaded) -> None:
    prompt_tokens = len(loaded._loaded.tokenizer("Hi").input_ids)
    limit = 512 - prompt_tokens
    for asked in (512, limit + 1, 10**9):
        with pytest.raises(GenerationError) as info:
            list(
                loaded.stream_completion("Hi", GenerationParams(max_new_tokens=asked), max_new_tokens_cap=512)
            )
        assert str(info.value) == (
            f"max_new_tokens is at most {limit} here: the model's 512-token window minus this "
            f"prompt's {prompt_tokens} tokens, and the operator's cap 512; you asked for {asked}"
        )
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
    assert 0 < stats.dropped_turns < len(history)  # old turns were dropped, not cut mid-way
    assert stats.context_window == 512
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
    assert stats.dropped_turns == len(history) - len(kept)
    assert stats.prompt_tokens == count(CHAT_PREAMBLE + "".join(kept) + tail)
    assert stats.context_summary() == (
        f"Context: {stats.prompt_tokens} + {stats.new_tokens} of 512 tokens (prompt + reply) · "
        f"{stats.dropped_turns} oldest turns left out to fit"
    )


@pytest.mark.slow
@pytest.mark.parametrize("message", ["", "   \n", None])
def test_an_empty_message_is_refused_at_the_service(loaded, message) -> None:
    """Inputs are checked once, where they enter (the service); the engine trusts them."""
    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings

    service = DemoService(loaded, AppSettings())
    with pytest.raises(GenerationError, match=r"is empty|must be text"):
        next(service.chat("session", [], message, GenerationParams()))


@pytest.mark.slow
def test_stats_rates_are_consistent(loaded) -> None:
    stats = list(loaded.stream_completion("Hello", GREEDY))[-1].stats
    assert math.isfinite(stats.tokens_per_second)
    assert 0 < stats.time_to_first_token <= stats.total_seconds
    assert stats.summary().startswith(f"{stats.new_tokens} tokens · first token ")


@pytest.mark.slow
def test_stop_sequences_end_the_reply_and_are_never_shown(loaded) -> None:
    """A stop sequence taken from the middle of the model's own greedy reply: the reply ends just
    before it, no streamed update ever shows a piece of it, and the reply counts as finished, not
    stopped by the user."""
    full = list(loaded.stream_completion("Hello", GREEDY))[-1]
    words = full.text.split()
    assert len(words) >= 4, full.text  # the tiny model's greedy reply has words to cut at
    stop = " " + words[len(words) // 2]
    before = full.text[: full.text.index(stop)].rstrip()
    params = GenerationParams(
        max_new_tokens=GREEDY.max_new_tokens, temperature=0, repetition_penalty=2.0, stop=[stop, "never"]
    )
    updates = list(loaded.stream_completion("Hello", params))
    assert updates[-1].text == before
    for update in updates:
        assert stop not in update.text
        assert before.startswith(update.text.rstrip())
    assert updates[-1].stats.stopped is False
    assert updates[-1].stats.new_tokens < full.stats.new_tokens
    assert GenerationParams(stop="END\n\nnever").stop == ("END", "never")  # one per line
    assert GenerationParams(stop=["\n"]).stop == ("\n",)  # a list keeps whitespace sequences


# ---------------------------------------------------------------- chat formats

# A minimal ChatML-style template, as instruction-tuned models ship in chat_template.jinja.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def templated_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random OPT saved with a chat template (chat_template.jinja beside its tokenizer)."""
    import shutil

    path = tmp_path_factory.mktemp("templated") / "tiny-chat"
    shutil.copytree(tiny_model_dir, path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@pytest.mark.slow
def test_a_model_with_a_chat_template_chats_through_it(manager, templated_model_dir: Path) -> None:
    manager.load(LoadConfig(str(templated_model_dir)))
    assert manager.chat_format() == TEMPLATE_FORMAT
    tokenizer = manager._loaded.tokenizer
    history = [("Hi", "Hello")]
    params = GenerationParams(max_new_tokens=8, temperature=0)
    stats = list(manager.stream_chat(history, "Capital?", params, system_prompt="Be brief."))[-1].stats
    expected = "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello\n<|user|>Capital?\n<|assistant|>"
    assert (
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Capital?"},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        == expected
    )
    # The template's text, tokenized without an extra BOS: that is the prompt the model got.
    assert stats.prompt_tokens == len(tokenizer(expected, add_special_tokens=False).input_ids)
    assert stats.dropped_turns == 0 and stats.context_window == 512


@pytest.mark.slow
def test_a_model_without_a_template_keeps_the_plain_transcript(loaded) -> None:
    assert loaded.chat_format() == PLAIN_FORMAT
    tokenizer = loaded._loaded.tokenizer
    params = GenerationParams(max_new_tokens=4, temperature=0)
    stats = list(loaded.stream_chat([], "Capital?", params, system_prompt="Be brief."))[-1].stats
    assert stats.prompt_tokens == len(tokenizer("Be brief.\n\nUser: Capital?\nAssistant:").input_ids)


# ---------------------------------------------------------------- prompt building, bounded


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def awkward_history(rng: random.Random) -> list[tuple[str, str]]:
    """Turns whose edges a byte-level BPE tokenizes differently alone and in context: empty
    replies, trailing spaces and newlines, punctuation, accents, tags inside the text."""
    pieces = ["Paris", " is", "", "  ", "\n", "é", "!", "?\n\n", "User:", "offload", "123", "\t"]
    return [
        ("".join(rng.choices(pieces, k=rng.randrange(6))), "".join(rng.choices(pieces, k=rng.randrange(6))))
        for _ in range(rng.randrange(1, 25))
    ]


@pytest.mark.parametrize("templated", [False, True])
def test_token_ids_are_the_whole_prompts_and_the_turns_those_of_the_old_layout(
    tiny_tokenizer, templated: bool
) -> None:
    """With the tiny model's real tokenizer (plain transcript and a chat template): the same turns
    dropped as the whole-conversation layout, and the ids are the whole prompt's tokenization (a
    later KV cache reuse matches prompts by id prefix)."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE if templated else None
    render = template_renderer(tokenizer) if templated else render_plain

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=not templated).input_ids)

    def count(text: str) -> int:
        return len(encode(text))

    rng = random.Random(7)
    for _ in range(15):
        history, system = awkward_history(rng), rng.choice(["", "Be brief. "])
        base = count(render(system, [], "now ?"))
        for room in (0, 5, 17, 40, 90, 400):
            reply = 512 - base - room
            expected = reference_layout(history, "now ?", count, 512, reply, render, system)
            prompt = build_chat_prompt(
                history, "now ?", count, 512, reply, 512, render, system, encode=encode
            )
            assert (prompt.text, prompt.dropped_turns, prompt.prompt_tokens) == expected
            assert list(prompt.input_ids) == encode(prompt.text)


class SpyTokenizer:
    """The loaded tokenizer, recording which thread tokenized how many characters."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.calls: list[tuple[str, int]] = []

    def __call__(self, text, *args, **kwargs):
        self.calls.append((threading.current_thread().name, len(text)))
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


@pytest.mark.slow
def test_the_chat_prompt_is_tokenized_before_the_request_waits_for_the_model(loaded) -> None:
    """The prompt is laid out and tokenized in the caller's thread, never in the scheduler under
    the model lock: with the lock held elsewhere, a refusal still comes at once, and a reply's
    prompt is ready before the model is free."""
    spy = SpyTokenizer(loaded._loaded.tokenizer)
    loaded._loaded.tokenizer = spy
    history = [(f"question {i} " * 30, f"answer {i} " * 30) for i in range(40)]
    results: dict[str, object] = {}

    def chat(key: str, params: GenerationParams) -> None:
        try:
            results[key] = list(loaded.stream_chat(history, "last question", params))[-1]
        except GenerationError as exc:
            results[key] = exc

    with loaded._model_lock:  # the model is busy (a load, a long step) for as long as this holds
        refused = threading.Thread(target=chat, args=("refused", GenerationParams(max_new_tokens=600)))
        refused.start()
        refused.join(5)
        assert isinstance(results.get("refused"), GenerationError), "the refusal waited for the model"
        answered = threading.Thread(target=chat, args=("answered", GenerationParams(max_new_tokens=8)))
        answered.start()
        deadline = time.monotonic() + 5
        while sum(1 for name, _ in spy.calls if name == answered.name) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        tokenized = sum(chars for name, chars in spy.calls if name == answered.name)
        assert tokenized > 0, "nothing was tokenized before the model was free"
        assert "answered" not in results
    answered.join(10)
    stats = results["answered"].stats
    assert 0 < stats.dropped_turns < len(history)
    assert not [call for call in spy.calls if call[0] == "optdemo-generate"]  # never under the lock
    # A turn each (and the first that did not fit) and a few renders: not the whole history again.
    assert tokenized < 6 * 512 * 8


@pytest.mark.slow
def test_the_prompt_is_laid_out_again_only_for_another_model(loaded, monkeypatch) -> None:
    prepared: list = []
    monkeypatch.setattr(loaded.engine, "submit", lambda prepare, *args: prepared.append(prepare) or iter(()))
    spy = SpyTokenizer(loaded._loaded.tokenizer)
    loaded._loaded.tokenizer = spy
    list(loaded.stream_chat([("Hi", "Hello")], "Capital?", GenerationParams(max_new_tokens=8)))
    before = len(spy.calls)
    assert before > 0  # laid out before the request was queued
    ready = prepared[0](loaded._loaded)
    assert len(spy.calls) == before  # the same model: the prompt made before is used as it is
    other = SpyTokenizer(spy._tokenizer)
    again = prepared[0](SimpleNamespace(model=loaded._loaded.model, tokenizer=other))
    assert other.calls and again.input_ids == ready.input_ids  # another model: laid out again
    assert ready.input_ids == list(spy._tokenizer(render_plain("", [("Hi", "Hello")], "Capital?")).input_ids)
