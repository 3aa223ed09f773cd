"""Memory budgets: what people type for max_memory, exact byte values, and every rejection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optdemo.core.budget import (
    MAX_DEVICE_BYTES,
    MemoryBudget,
    describe_gpu_count,
    format_bytes,
    missing_gpus,
    parse_device,
    parse_max_memory,
    parse_size,
)
from optdemo.core.errors import BudgetError, OptdemoError

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
GB = 10**9

# ---------------------------------------------------------------- accepted forms


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0=5GiB,cpu=20GiB", {0: 5 * GiB, "cpu": 20 * GiB}),
        ("cuda:0=5GiB, cpu=20 GB", {0: 5 * GiB, "cpu": 20 * GB}),
        ("cpu=512MiB", {"cpu": 512 * MiB}),
        ('{0: "5GiB", "cpu": "20GiB"}', {0: 5 * GiB, "cpu": 20 * GiB}),
        ("{'cpu': '1GB', 'disk': '2TB'}", {"cpu": GB, "disk": 2 * 10**12}),
        ('{"0": "1GiB", "cuda:1": "2GiB"}', {0: GiB, 1: 2 * GiB}),
        ("{0: 1073741824}", {0: GiB}),  # a bare integer in the dict form means bytes
        ("0=1GiB;1=2GiB;cpu=3GiB", {0: GiB, 1: 2 * GiB, "cpu": 3 * GiB}),
        ("0=1GiB ; cpu=3GiB, disk=1TiB", {0: GiB, "cpu": 3 * GiB, "disk": TiB}),
        ("gpu:1=1GiB", {1: GiB}),
        ("CUDA : 2 = 1gib", {2: GiB}),
        ("cuda=1GiB", {0: GiB}),  # "cuda" alone is the first GPU, as in torch
        ("  CPU = 0.5GiB  ", {"cpu": 2**29}),
        ("cpu=.5KiB", {"cpu": 512}),
        ("cpu=5.GiB", {"cpu": 5 * GiB}),
        ("cpu=0B", {"cpu": 0}),
        ("cpu=1024TiB", {"cpu": MAX_DEVICE_BYTES}),  # exactly 1 PiB is still allowed
        ("0=1GiB,,cpu=1GiB,", {0: GiB, "cpu": GiB}),  # empty entries are ignored
        ("Disk=7B", {"disk": 7}),
    ],
)
def test_parse_max_memory_accepts(spec: str, expected: dict) -> None:
    budget = parse_max_memory(spec)
    assert budget.as_max_memory() == expected
    assert all(type(size) is int for _, size in budget.limits)


def test_parse_max_memory_accepts_real_dict() -> None:
    budget = parse_max_memory({0: "5GiB", "cpu": "20GiB", "cuda:1": 123, "disk": "1 TB"})
    assert budget.as_max_memory() == {0: 5 * GiB, 1: 123, "cpu": 20 * GiB, "disk": 10**12}


def test_parse_max_memory_returns_a_budget_unchanged() -> None:
    budget = parse_max_memory("cpu=1GiB")
    assert parse_max_memory(budget) is budget


def test_devices_are_in_accelerate_order() -> None:
    budget = parse_max_memory("disk=4GiB, cpu=3GiB, 1=2GiB, 0=1GiB")
    assert list(budget.as_max_memory()) == [0, 1, "cpu", "disk"]
    assert budget.gpu_indices == (0, 1)
    assert budget.in_memory_bytes == 6 * GiB
    assert budget.get("disk") == 4 * GiB
    assert budget.get(7) == 0
    assert budget.get(7, default=-1) == -1


_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


@pytest.mark.parametrize("unit", list(_UNITS))
@pytest.mark.parametrize("spelling", [str, str.lower, str.upper, str.swapcase])
def test_units_are_exact_and_case_insensitive(unit: str, spelling) -> None:
    assert parse_size(f"3{spelling(unit)}") == 3 * _UNITS[unit]
    assert parse_size(f" 3 {spelling(unit)} ") == 3 * _UNITS[unit]
    assert parse_max_memory(f"cpu=3{spelling(unit)}").get("cpu") == 3 * _UNITS[unit]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5GiB", 2**29),
        ("1.5GiB", 3 * 2**29),
        ("0.25MiB", 2**18),
        ("2.5GB", 2_500_000_000),
        ("0.001KB", 1),
        ("1.5B", 1),  # a fraction of a byte is dropped
        (0, 0),
        (4096, 4096),  # an int is a byte count
    ],
)
def test_parse_size_values(text, expected: int) -> None:
    assert parse_size(text) == expected


def test_gb_is_decimal_and_gib_is_binary() -> None:
    assert parse_max_memory("cpu=1GB").get("cpu") == 1_000_000_000
    assert parse_max_memory("cpu=1GiB").get("cpu") == 1_073_741_824
    assert parse_max_memory("cpu=1GB") != parse_max_memory("cpu=1GiB")


def test_decimal_sizes_are_exact() -> None:
    assert parse_size("4.1GB") == 4_100_000_000
    assert parse_size("2.01KB") == 2010
    assert parse_max_memory("cpu=4.1GB") == parse_max_memory("cpu=4100MB")


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("cpu=20GiB,0=5GiB", "0=5GiB,cpu=20GiB"),
        ("cpu=1536MiB", "cpu=1536MiB"),
        ("cpu=20GB", "cpu=19531250KiB"),
        ("cpu=1000B", "cpu=1000B"),
        ("cpu=0B", "cpu=0B"),
        ("disk=2TiB,cuda:3=1KiB", "3=1KiB,disk=2TiB"),
    ],
)
def test_str_is_canonical_and_round_trips(spec: str, canonical: str) -> None:
    budget = parse_max_memory(spec)
    assert str(budget) == canonical
    assert parse_max_memory(str(budget)) == budget


def test_equality_ignores_order_and_spelling() -> None:
    a = parse_max_memory("0=1GiB,cpu=2GiB")
    b = parse_max_memory("cpu=2048MiB; cuda:0=1024MiB")
    c = parse_max_memory({"cpu": 2 * GiB, 0: "1GiB"})
    assert a == b == c
    assert hash(a) == hash(b) == hash(c)
    assert len({a, b, c}) == 1
    assert a != parse_max_memory("0=1GiB,cpu=2GiB,disk=1GiB")
    assert a != parse_max_memory("0=1GiB,cpu=2GB")


def test_budget_is_immutable() -> None:
    budget = parse_max_memory("cpu=1GiB")
    with pytest.raises(AttributeError):
        budget.limits = ()  # type: ignore[misc]


# ---------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("tpu=1GiB", "unknown device 'tpu'"),
        ("npu:0=1GiB", "unknown device 'npu:0'"),
        ("-1=1GiB", "unknown device '-1'"),
        ("0=1GiB,cuda:0=2GiB", "device 0 appears twice"),
        ("cpu=1GiB,CPU=2GiB", "device cpu appears twice"),
        ("cpu=-1GiB", "not a size"),
        ("cpu=abcGiB", "not a size"),
        ("cpu=1e3GiB", "not a size"),
        ("cpu=5", "has no unit"),
        ("cpu=5 XB", "unknown unit 'XB'"),
        ("cpu=2PiB", "unknown unit 'PiB'"),
        ("cpu=", "not a size"),
        ("", "empty"),
        ("   \n\t", "empty"),
        (",;,", "empty"),
        ("cpu", "has no '='"),
        ("cpu=2000TiB", "absurdly large"),
        (f"cpu={MAX_DEVICE_BYTES + 1}B", "absurdly large"),
        ("cpu=1GiB" + " " * 2000, "characters long"),
        ("x" * 5000, "characters long"),
        ("cuda:2000=1GiB", "not a GPU any machine has"),
        ("{1, 2}", "must be a dict"),
        ("{'cpu': '1GiB'", "not valid"),
        ("{'cpu': __import__('os')}", "not valid"),
        ("{}", "empty"),
        ("{'cpu': True}", "not True"),
        ("{'cpu': 5.0}", "needs a unit"),
        ("{'cpu': None}", "not NoneType"),
        ("{'cpu': -5}", "positive"),
        ("{-1: '1GiB'}", "negative"),
        ("{True: '1GiB'}", "unknown device True"),
        ("{1.5: '1GiB'}", "unknown device 1.5"),
    ],
)
def test_parse_max_memory_rejects(spec: str, fragment: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_max_memory(spec)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"cpu": True}, "not True"),
        ({"cpu": False}, "not False"),
        ({"cpu": 5.0}, "needs a unit"),
        ({"cpu": float("nan")}, "needs a unit"),
        ({"cpu": None}, "not NoneType"),
        ({"cpu": ["1GiB"]}, "not list"),
        ({"cpu": 2**60}, "absurdly large"),
        ({True: "1GiB"}, "unknown device"),
        ({None: "1GiB"}, "unknown device"),
        ({-3: "1GiB"}, "negative"),
        ({0: "1GiB", "cuda:0": "1GiB"}, "appears twice"),
        ({}, "empty"),
    ],
)
def test_parse_max_memory_rejects_dicts(spec: dict, fragment: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_max_memory(spec)
    assert fragment in str(info.value)


@pytest.mark.parametrize("spec", [5, 5.0, None, ["cpu=1GiB"], b"cpu=1GiB"])
def test_parse_max_memory_rejects_other_types(spec) -> None:
    with pytest.raises(BudgetError, match="max_memory must be text"):
        parse_max_memory(spec)


def test_budget_error_is_an_optdemo_error_and_a_value_error() -> None:
    with pytest.raises(BudgetError) as info:
        parse_max_memory("tpu=1GiB")
    assert isinstance(info.value, OptdemoError)
    assert isinstance(info.value, ValueError)


def test_error_messages_do_not_echo_huge_input() -> None:
    with pytest.raises(BudgetError) as info:
        parse_max_memory("cpu=" + "z" * 1900)
    assert len(str(info.value)) < 200


def test_dict_with_huge_digit_gpu_key_raises_budget_error() -> None:
    with pytest.raises(BudgetError):
        parse_max_memory({"9" * 5000: "1GiB"})


def test_dict_int_gpu_index_is_checked_like_text() -> None:
    with pytest.raises(BudgetError, match="not a GPU any machine has"):
        parse_max_memory("5000=1GiB")
    with pytest.raises(BudgetError, match="not a GPU any machine has"):
        parse_max_memory({5000: "1GiB"})


@pytest.mark.parametrize(
    ("key", "expected"),
    [(0, 0), ("0", 0), (" cuda:3 ", 3), ("GPU:2", 2), ("cuda", 0), ("CPU", "cpu"), ("disk", "disk")],
)
def test_parse_device(key, expected) -> None:
    assert parse_device(key) == expected


# ---------------------------------------------------------------- GPUs and formatting


def test_missing_gpus() -> None:
    budget = parse_max_memory("0=1GiB,2=1GiB,cpu=1GiB")
    assert missing_gpus(budget, 0) == (0, 2)
    assert missing_gpus(budget, 1) == (2,)
    assert missing_gpus(budget, 3) == ()
    assert missing_gpus(parse_max_memory("cpu=1GiB"), 0) == ()


def test_describe_gpu_count() -> None:
    assert describe_gpu_count(0) == "this machine has no GPU"
    assert describe_gpu_count(1) == "this machine has 1 GPU (0)"
    assert describe_gpu_count(2) == "this machine has 2 GPUs (0-1)"
    assert describe_gpu_count(8) == "this machine has 8 GPUs (0-7)"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (100 * MiB, "100 MiB"),
        (512 * MiB, "512 MiB"),
        (int(1.234 * GiB), "1.23 GiB"),
        (20 * GB, "18.6 GiB"),
        (122.4 * GiB, "122 GiB"),
        (5 * TiB, "5 TiB"),
        (MAX_DEVICE_BYTES, "1024 TiB"),
        (-2048, "-2 KiB"),
    ],
)
def test_format_bytes(n, text: str) -> None:
    assert format_bytes(n) == text


# ---------------------------------------------------------------- fuzzing


def _assert_budget_or_budget_error(spec) -> None:
    try:
        budget = parse_max_memory(spec)
    except BudgetError as exc:
        assert str(exc)  # a message, always
        return
    assert isinstance(budget, MemoryBudget)
    assert budget.limits
    for device, size in budget.limits:
        assert type(size) is int
        assert 0 <= size <= MAX_DEVICE_BYTES
        assert device in ("cpu", "disk") or (type(device) is int and device >= 0)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_fuzz_any_text(spec: str) -> None:
    _assert_budget_or_budget_error(spec)


_DEVICE_NAMES = ["0", "1", "7", "cuda:0", "CUDA:1", "gpu:2", "cuda", "cpu", "CPU", "disk", " cpu "]
_DEVICE_MISTAKES = ["tpu", "-1", "cuda:-1", "2000", "", "cuda:", "٣", "0x1", "1.0", "cpu cpu"]
_DEVICES = st.sampled_from([*_DEVICE_NAMES, *_DEVICE_MISTAKES])
_NUMBERS = st.one_of(
    st.integers(min_value=0, max_value=10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from([".5", "5.", "0.0", "-3", "1e3", "", " 7 ", "1_000", "٥", "..", "0" * 500, "9" * 1500]),
    st.from_regex(r"\d{1,30}(\.\d{0,8})?", fullmatch=True),
)
_UNIT_TEXT = st.sampled_from(
    ["", "B", "kb", "KB", "MiB", "gib", "GiB", "TB", "TiB", "PiB", "XB", " GiB", "g", "GiBs", "Gi B"]
)
_EQUALS = st.sampled_from(["=", " = ", "", "==", ":"])
_SEPARATORS = st.sampled_from([",", ";", ", ", " ; ", ",,", "\n"])
_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.builds(lambda n, u: n + u, _NUMBERS, _UNIT_TEXT),
)


@st.composite
def near_valid_specs(draw) -> str:
    """Budget text that is mostly right: real device names, numbers and units, with mistakes."""
    entries = []
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        entry = draw(_DEVICES) + draw(_EQUALS) + draw(_NUMBERS) + draw(_UNIT_TEXT)
        if draw(st.integers(min_value=0, max_value=4)) == 0:  # sometimes, junk somewhere
            at = draw(st.integers(min_value=0, max_value=len(entry)))
            entry = entry[:at] + draw(st.text(max_size=4)) + entry[at:]
        entries.append(entry)
    if draw(st.booleans()):
        return draw(_SEPARATORS).join(entries)
    # The dict form as text, with keys and values of any literal type.
    items = draw(
        st.lists(
            st.tuples(st.one_of(_DEVICES, st.integers(min_value=-5, max_value=3000), st.booleans()), _VALUES),
            max_size=4,
        )
    )
    text = "{" + ", ".join(f"{key!r}: {value!r}" for key, value in items) + "}"
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        at = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:at] + draw(st.text(max_size=3)) + text[at:]
    return text


@settings(max_examples=600, deadline=None)
@given(near_valid_specs())
def test_fuzz_near_valid_specs(spec: str) -> None:
    _assert_budget_or_budget_error(spec)


_DICT_KEYS = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.text(max_size=12),
    _DEVICES,
    st.booleans(),
    st.floats(allow_nan=True),
    st.none(),
    st.tuples(st.integers()),
    st.binary(max_size=4),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_DICT_KEYS, st.one_of(_VALUES, st.lists(st.integers(), max_size=2)), max_size=5))
def test_fuzz_dict_form(spec: dict) -> None:
    _assert_budget_or_budget_error(spec)


_BUDGET_DEVICES = st.one_of(st.integers(min_value=0, max_value=1024), st.sampled_from(["cpu", "disk"]))


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        _BUDGET_DEVICES, st.integers(min_value=0, max_value=MAX_DEVICE_BYTES), min_size=1, max_size=6
    )
)
def test_fuzz_str_round_trips(limits: dict) -> None:
    budget = MemoryBudget(tuple(limits.items()))
    assert parse_max_memory(str(budget)) == budget
    assert parse_max_memory(limits) == budget
    assert budget.as_max_memory() == limits
