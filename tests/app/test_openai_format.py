"""The OpenAI wire format's parsers (optdemo.app.openai_format, with the field checks of
optdemo.app.openai_fields) on bad input, without a server.

Every malformed or unsupported field is a 400 in OpenAI's shape that names the field and says what
this server supports; no input makes a parser raise anything but :class:`OpenAIError` (which the
routes answer as JSON), so nothing reaches the HTTP layer as a plain-text 500 with a traceback.
"""

from __future__ import annotations

import pytest

from optdemo.app.openai_fields import MAX_STOP_SEQUENCES, FieldError, check_unicode
from optdemo.app.openai_format import OpenAIError, parse_chat, parse_completion
from optdemo.core.defaults import MAX_STOP_CHARS

HELLO = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> dict:
    """A valid chat body with ``fields`` added."""
    return {"messages": HELLO, **fields}


def refusal(body: object, completion: bool = False) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse_completion(body) if completion else parse_chat(body, max_chars=100)
    assert info.value.status == 400
    assert set(info.value.to_dict()["error"]) == {"message", "type", "param", "code"}
    return info.value


# ---------------------------------------------------------------------------------- stop
@pytest.mark.parametrize(
    "stop", [True, False, 5, 0, 1.5, {"a": 1}, {"STOP": True}, [1], ["a", None], [["a"]]]
)
def test_stop_of_the_wrong_type_is_a_400_naming_stop(stop: object) -> None:
    for completion in (False, True):
        body = {"prompt": "Once", "stop": stop} if completion else chat(stop=stop)
        err = refusal(body, completion)
        assert err.param == "stop"
        assert "stop must be a text or a list of up to 4" in err.message


def test_a_stop_dict_is_refused_not_read_for_its_keys() -> None:
    err = refusal(chat(stop={"STOP": 1, "END": 2}))
    assert err.param == "stop" and "dict" not in err.message


def test_stop_sequences_are_held_to_the_engines_length_cap_and_openais_count() -> None:
    longest = "x" * MAX_STOP_CHARS
    assert parse_chat(chat(stop=longest), max_chars=100).sampling.stop == (longest,)
    err = refusal(chat(stop="x" * 500))
    assert err.param == "stop"
    assert f"at most {MAX_STOP_CHARS} characters" in err.message and "500" in err.message
    err = refusal(chat(stop=["a", "y" * (MAX_STOP_CHARS + 1)]))
    assert err.param == "stop" and f"{MAX_STOP_CHARS + 1}" in err.message
    four = ["1", "2", "3", "4"]
    assert parse_chat(chat(stop=four), max_chars=100).sampling.stop == tuple(four)
    assert MAX_STOP_SEQUENCES == 4
    assert refusal(chat(stop=[*four, "5"])).param == "stop"
    # None and an empty list mean no stop sequence, as OpenAI's API reads them.
    assert parse_chat(chat(stop=None), max_chars=100).sampling.stop == ()
    assert parse_chat(chat(stop=[]), max_chars=100).sampling.stop == ()


# ---------------------------------------------------------------------------------- unsupported fields
@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("response_format", {"type": "json_object"}, 'response_format {"type": "text"}'),
        ("response_format", {"type": "json_schema", "json_schema": {}}, "plain text"),
        ("response_format", "json", "plain text"),
        ("tools", [{"type": "function", "function": {"name": "f"}}], "text only"),
        ("tool_choice", "required", "text only"),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}, "text only"),
        ("functions", [{"name": "f"}], "text only"),
        ("function_call", {"name": "f"}, "text only"),
        ("logprobs", True, "log probabilities"),
        ("top_logprobs", 3, "log probabilities"),
        ("n", 2, "one reply per request"),
        ("n", True, "one reply per request"),
        ("n", "1", "one reply per request"),
        ("presence_penalty", 0.5, "repetition_penalty"),
        ("frequency_penalty", -1, "repetition_penalty"),
        ("frequency_penalty", "0", "repetition_penalty"),
        ("logit_bias", {"50256": -100}, "logit_bias"),
    ],
)
def test_unsupported_chat_fields_are_refused_naming_the_field_and_what_is_supported(
    field: str, value: object, says: str
) -> None:
    err = refusal(chat(**{field: value}))
    assert err.param == field
    assert err.code == "unsupported_parameter"
    assert err.message.startswith(field) and says in err.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("response_format", {"type": "text"}),
        ("response_format", None),
        ("tool_choice", "none"),
        ("tools", []),
        ("logprobs", False),
        ("top_logprobs", 0),
        ("n", 1),
        ("n", None),
        ("presence_penalty", 0),
        ("frequency_penalty", 0.0),
        ("logit_bias", {}),
        ("logit_bias", None),
        ("user", "someone"),
    ],
)
def test_the_default_values_of_unsupported_fields_are_accepted(field: str, value: object) -> None:
    assert parse_chat(chat(**{field: value}), max_chars=100).message == "hi"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logprobs", 2),
        ("logprobs", 0),
        ("echo", True),
        ("suffix", "end"),
        ("best_of", 3),
        ("n", 3),
        ("presence_penalty", 1),
        ("frequency_penalty", 2),
        ("logit_bias", {"1": 5}),
    ],
)
def test_unsupported_completion_fields_are_refused(field: str, value: object) -> None:
    err = refusal({"prompt": "Once", field: value}, completion=True)
    assert err.param == field and err.code == "unsupported_parameter"


def test_completion_accepts_the_defaults() -> None:
    body = {"prompt": "Once", "n": 1, "best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0}
    assert parse_completion(body).prompt == "Once"


# ---------------------------------------------------------------------------------- unicode
@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0]"),
        ({"messages": HELLO, "stop": ["\ud83d"]}, "stop[0]"),
        ({"messages": HELLO, "model": "\ud800"}, "model"),
        ({"messages": HELLO, "\ud800": 1}, "a field name"),
    ],
)
def test_lone_surrogates_are_refused_as_invalid_unicode(body: dict, where: str) -> None:
    err = refusal(body)
    assert "not valid Unicode" in err.message and where in err.message
    assert "TypeError" not in err.message
    with pytest.raises(OpenAIError, match="not valid Unicode"):
        parse_completion({"prompt": "x\udc80"})


def test_check_unicode_walks_deep_bodies_without_recursion() -> None:
    deep: object = "\ud800"
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    with pytest.raises(FieldError, match="not valid Unicode"):
        check_unicode({"messages": deep})
    check_unicode({"messages": [{"role": "user", "content": "élan 😀"}]})  # real characters pass


# ---------------------------------------------------------------------------------- robustness
ODD_VALUES = [None, True, 0, -1, 1.5, "", "x", [], [None], [[]], {}, {"a": None}, ["\ud800"]]
FIELDS = [
    "messages", "model", "stop", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens",
    "temperature", "response_format", "tools", "tool_choice", "logprobs", "logit_bias", "prompt",
    "presence_penalty", "echo", "best_of",
]  # fmt: skip


@pytest.mark.parametrize("field", FIELDS)
def test_no_value_of_any_field_escapes_the_parsers_as_another_exception(field: str) -> None:
    """A parser either accepts a body or refuses it with an OpenAIError: never a TypeError or
    an AttributeError that the server would answer as a 500."""
    for value in ODD_VALUES:
        for parse, base in (
            (lambda b: parse_chat(b, max_chars=100), {"messages": HELLO}),
            (parse_completion, {"prompt": "Once"}),
        ):
            try:
                parse({**base, field: value})
            except OpenAIError as err:
                assert err.status == 400 and err.message
    for body in (None, [], "x", 3, [{"role": "user"}]):
        assert refusal(body).message
