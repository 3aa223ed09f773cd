"""LoadConfig normalisation and equality, the offline OPT catalog, and model resolution."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from optdemo.core.budget import MemoryBudget, parse_max_memory
from optdemo.core.catalog import OPT_SIZES, TINY_MODEL_ID, catalog, catalog_config_dict, catalog_entry
from optdemo.core.errors import BudgetError, ConfigError, OptdemoError
from optdemo.core.load_config import LoadConfig, normalize_model
from optdemo.models.source import hub_error_message, resolve_model

# ---------------------------------------------------------------- LoadConfig normalisation


@pytest.mark.parametrize(
    ("given", "model", "display"),
    [
        ("opt-1.3b", "facebook/opt-1.3b", "opt-1.3b"),
        ("OPT-1.3B", "facebook/opt-1.3b", "opt-1.3b"),
        ("  facebook/opt-66b ", "facebook/opt-66b", "opt-66b"),
        ("Facebook/OPT-125m", "facebook/opt-125m", "opt-125m"),
        ("tiny-opt", TINY_MODEL_ID, "tiny-opt"),
        ("Tiny-Opt", TINY_MODEL_ID, "tiny-opt"),
        ("optdemo/tiny-opt", TINY_MODEL_ID, "tiny-opt"),
        ("gpt2", "gpt2", "gpt2"),
        ("EleutherAI/gpt-neo-125m", "EleutherAI/gpt-neo-125m", "gpt-neo-125m"),
    ],
)
def test_model_names_are_normalised(given: str, model: str, display: str) -> None:
    config = LoadConfig(given)
    assert config.model == model
    assert config.display_name == display
    assert normalize_model(given) == model


def test_local_directory_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    expected = str(tmp_path / "my-model")
    assert LoadConfig("my-model").model == expected
    assert LoadConfig("./my-model/").model == expected
    assert LoadConfig(str(tmp_path / "my-model") + "/").model == expected
    assert LoadConfig("my-model").display_name == "my-model"
    assert LoadConfig("./my-model") == LoadConfig(expected)


def test_offload_folder_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert LoadConfig("opt-125m", offload_folder="offload").offload_folder == str(tmp_path / "offload")
    assert LoadConfig("opt-125m", offload_folder=" ./a/../b ").offload_folder == str(tmp_path / "b")
    assert LoadConfig("opt-125m", offload_folder="~/off").offload_folder == str(tmp_path / "home" / "off")
    assert LoadConfig("opt-125m", offload_folder="   ").offload_folder is None
    assert LoadConfig("opt-125m", offload_folder=tmp_path / "p").offload_folder == str(tmp_path / "p")


def test_max_memory_is_parsed() -> None:
    config = LoadConfig("opt-1.3b", max_memory="cpu=20GiB, 0=5GiB")
    assert isinstance(config.max_memory, MemoryBudget)
    assert config.max_memory == parse_max_memory("0=5GiB,cpu=20GiB")
    assert config.max_memory.as_max_memory() == {0: 5 * 2**30, "cpu": 20 * 2**30}
    assert LoadConfig("opt-1.3b", max_memory={"cpu": "1GiB"}).max_memory == parse_max_memory("cpu=1GiB")
    budget = parse_max_memory("cpu=1GiB")
    assert LoadConfig("opt-1.3b", max_memory=budget).max_memory is budget
    assert LoadConfig("opt-1.3b").max_memory is None


def test_bad_max_memory_is_a_budget_error() -> None:
    with pytest.raises(BudgetError, match="unknown device 'tpu'"):
        LoadConfig("opt-1.3b", max_memory="tpu=1GiB")


def test_revision_and_tokenizer_are_normalised() -> None:
    assert LoadConfig("opt-1.3b", revision=" main ").revision == "main"
    assert LoadConfig("opt-1.3b", revision="").revision is None
    assert LoadConfig("opt-1.3b", revision="refs/pr/1").revision == "refs/pr/1"
    assert LoadConfig("opt-1.3b", tokenizer="opt-125m").tokenizer == "facebook/opt-125m"
    assert LoadConfig("opt-1.3b", tokenizer="  ").tokenizer is None


def test_label_is_only_a_display_name() -> None:
    config = LoadConfig("opt-1.3b", label="My OPT")
    assert config.display_name == "My OPT"
    assert config == LoadConfig("opt-1.3b")
    assert hash(config) == hash(LoadConfig("opt-1.3b"))


def test_with_changes_normalises_again() -> None:
    config = LoadConfig("opt-1.3b")
    changed = config.with_changes(model="opt-350m", max_memory="cpu=1GiB", dtype="float32")
    assert changed.model == "facebook/opt-350m"
    assert changed.max_memory == parse_max_memory("cpu=1GiB")
    assert changed.dtype == "float32"
    assert config.model == "facebook/opt-1.3b"  # the original is unchanged
    with pytest.raises(ConfigError, match="dtype"):
        config.with_changes(dtype="int3")


def test_config_is_frozen() -> None:
    config = LoadConfig("opt-1.3b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dtype = "float32"  # type: ignore[misc]


# ---------------------------------------------------------------- equality: reuse versus reload


def test_equal_configs_are_equal_and_hash_equal(tmp_path: Path) -> None:
    a = LoadConfig("opt-1.3b", max_memory="0=2GiB,cpu=10GiB", offload_folder=str(tmp_path / "off"))
    b = LoadConfig(
        " facebook/OPT-1.3b",
        max_memory="cpu=10240MiB; cuda:0=2048MiB",
        offload_folder=str(tmp_path / "x" / ".." / "off"),
        dtype="auto",
        revision="",
        label="another label",
    )
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"max_memory": "0=2GiB,cpu=11GiB"},
        {"max_memory": None},
        {"dtype": "float16"},
        {"offload_folder": "/tmp/other-offload"},
        {"offload_folder": None},
        {"revision": "main"},
        {"quantization": "8bit"},
        {"tokenizer": "opt-125m"},
        {"trust_remote_code": True},
        {"model": "opt-2.7b"},
    ],
)
def test_any_real_difference_makes_configs_unequal(changes: dict) -> None:
    base = LoadConfig("opt-1.3b", max_memory="0=2GiB,cpu=10GiB", offload_folder="/tmp/offload")
    assert base.with_changes(**changes) != base


# ---------------------------------------------------------------- invalid configurations


@pytest.mark.parametrize("dtype", ["fp16", "float64", "", "FLOAT16", "int8", None])
def test_invalid_dtype(dtype) -> None:
    with pytest.raises(ConfigError, match=r"dtype .* is not supported"):
        LoadConfig("opt-1.3b", dtype=dtype)


@pytest.mark.parametrize("quantization", ["16bit", "", "8-bit", "NONE", None])
def test_invalid_quantization(quantization) -> None:
    with pytest.raises(ConfigError, match=r"quantization .* is not supported"):
        LoadConfig("opt-1.3b", quantization=quantization)


@pytest.mark.parametrize("revision", ["../main", "main/../x", "a b", "x" * 201, "v1;rm -rf", "a..b"])
def test_invalid_revision(revision: str) -> None:
    with pytest.raises(ConfigError, match="is not a branch, tag or commit name"):
        LoadConfig("opt-1.3b", revision=revision)


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ("../etc", "does not exist"),
        ("../../../../../../nonexistent-optdemo", "does not exist"),
        ("/nonexistent/dir", "does not exist"),
        ("./missing", "does not exist"),
        ("~/definitely-missing-optdemo-dir", "does not exist"),
        ("a\\b", "does not exist"),
        ("a/b/c", "neither a local folder nor a Hugging Face repo id"),
        ("a/../b", "neither a local folder nor a Hugging Face repo id"),
        ("owner/..", "neither a local folder nor a Hugging Face repo id"),
        ("foo bar", "neither a local folder nor a Hugging Face repo id"),
        ("-x/y", "neither a local folder nor a Hugging Face repo id"),
        ("owner/" + "n" * 97, "neither a local folder nor a Hugging Face repo id"),
        ("", "no model given"),
        ("   ", "no model given"),
        ("x" * 400, "400 characters long"),
        (None, "no model given"),
        (5, "no model given"),
    ],
)
def test_invalid_model(model, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative names must not find something in the working tree
    with pytest.raises(ConfigError) as info:
        LoadConfig(model)
    assert fragment in str(info.value)
    assert isinstance(info.value, OptdemoError)


def test_trust_remote_code_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="trust_remote_code must be true or false"):
        LoadConfig("opt-1.3b", trust_remote_code="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the catalog

PARAMETERS = {
    "opt-125m": 125239296,
    "opt-350m": 331196416,
    "opt-1.3b": 1315758080,
    "opt-2.7b": 2651596800,
    "opt-6.7b": 6658473984,
    "opt-13b": 12853473280,
    "opt-30b": 29974540288,
    "opt-66b": 65719701504,
}
# Published architecture: (decoder layers, hidden size, ffn size).
SHAPES = {
    "opt-125m": (12, 768, 3072),
    "opt-350m": (24, 1024, 4096),
    "opt-1.3b": (24, 2048, 8192),
    "opt-2.7b": (32, 2560, 10240),
    "opt-6.7b": (32, 4096, 16384),
    "opt-13b": (40, 5120, 20480),
    "opt-30b": (48, 7168, 28672),
    "opt-66b": (64, 9216, 36864),
}


def test_catalog_has_all_eight_sizes_smallest_first() -> None:
    assert tuple(PARAMETERS) == OPT_SIZES
    assert tuple(catalog()) == OPT_SIZES
    sizes = [entry.parameters for entry in catalog().values()]
    assert sizes == sorted(sizes)


@pytest.mark.parametrize("name", OPT_SIZES)
def test_catalog_entry_numbers(name: str) -> None:
    entry = catalog()[name]
    assert entry.name == name
    assert entry.repo_id == f"facebook/{name}"
    assert entry.parameters == PARAMETERS[name]
    assert entry.checkpoint_bytes == 2 * PARAMETERS[name]
    assert entry.checkpoint_dtype == "float16"
    assert catalog_entry(f"facebook/{name}") == entry
    assert catalog_entry(f"  FACEBOOK/{name.upper()} ") == entry


@pytest.mark.parametrize("name", OPT_SIZES)
def test_shipped_config_is_the_published_architecture(name: str) -> None:
    config = catalog_config_dict(name)
    layers, hidden, ffn = SHAPES[name]
    assert config["model_type"] == "opt"
    assert (config["num_hidden_layers"], config["hidden_size"], config["ffn_dim"]) == (layers, hidden, ffn)
    assert config["vocab_size"] == 50272
    assert config["max_position_embeddings"] == 2048


@pytest.mark.parametrize("name", OPT_SIZES)
def test_meta_model_has_the_catalog_parameter_count(name: str) -> None:
    import torch

    from optdemo.plan.planner import meta_model

    source = resolve_model(LoadConfig(name).model)
    assert source.kind == "catalog"
    assert source.location == f"facebook/{name}"
    assert source.catalog == catalog()[name]
    model = meta_model(source, torch.float16)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    assert tied == {"lm_head.weight"}
    unique = sum(
        param.numel() for key, param in model.named_parameters(remove_duplicate=False) if key not in tied
    )
    assert unique == PARAMETERS[name]
    assert all(param.device.type == "meta" for param in model.parameters())


def test_catalog_lookups() -> None:
    assert catalog_entry("gpt2") is None
    assert catalog_entry("facebook/opt-7b") is None
    first = catalog_config_dict("opt-125m")
    first["hidden_size"] = 1
    assert catalog_config_dict("facebook/opt-125m")["hidden_size"] == 768  # a fresh copy each call
    with pytest.raises(KeyError, match="not in the OPT catalog"):
        catalog_config_dict("opt-7b")


# ---------------------------------------------------------------- resolving models

NOT_REACHABLE = "cannot reach the Hugging Face Hub"


def test_uncached_hub_model_offline_is_a_config_error() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ConfigError) as info:
        resolve_model(LoadConfig("optdemo-tests/not-cached-anywhere").model)
    message = str(info.value)
    assert NOT_REACHABLE in message
    assert "optdemo-tests/not-cached-anywhere" in message


def test_catalog_model_with_a_revision_needs_the_hub() -> None:
    # The shipped configs are the main branch's; another revision must be fetched.
    with pytest.raises(ConfigError) as info:
        resolve_model("facebook/opt-125m", revision="v1.0")
    assert NOT_REACHABLE in str(info.value)
    assert "facebook/opt-125m@v1.0" in str(info.value)


def test_local_dir_without_config_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        resolve_model(LoadConfig(str(tmp_path)).model)


@pytest.mark.parametrize("config_class", ["DistilBertConfig", "T5Config"])
def test_non_causal_lm_is_a_config_error(config_class: str, tmp_path: Path) -> None:
    import transformers

    getattr(transformers, config_class)().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a causal language model") as info:
        resolve_model(LoadConfig(str(tmp_path)).model)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not a valid JSON file"),
        (json.dumps({"model_type": "no-such-architecture"}), "no-such-architecture"),
        (json.dumps({"hidden_size": 3}), "model_type"),
    ],
)
def test_unreadable_local_config_is_a_config_error(content: str, fragment: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match="cannot read the configuration") as info:
        resolve_model(LoadConfig(str(tmp_path)).model)
    assert fragment in str(info.value)


@pytest.mark.slow
def test_local_model_resolves(tiny_model_dir: Path) -> None:
    source = resolve_model(LoadConfig(str(tiny_model_dir)).model)
    assert source.kind == "local"
    assert source.location == str(tiny_model_dir)
    assert source.config.model_type == "opt"
    assert source.config.num_hidden_layers == 6
    assert resolve_model(str(tiny_model_dir)) is source  # cached


# ---------------------------------------------------------------- Hub error messages


def test_hub_error_messages() -> None:
    import httpx
    from huggingface_hub import errors

    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/x"))
    gated = hub_error_message(errors.GatedRepoError("no", response=response), "meta/x")
    assert gated.startswith("meta/x is gated: accept its licence")
    assert "HF_TOKEN" in gated
    missing = hub_error_message(errors.RepositoryNotFoundError("no", response=response), "a/b")
    assert missing.startswith("a/b was not found on the Hugging Face Hub")
    revision = hub_error_message(errors.RevisionNotFoundError("no", response=response), "a/b", "v9")
    assert revision == "revision 'v9' does not exist in a/b: use a branch, tag or commit it has"
    assert NOT_REACHABLE in hub_error_message(ConnectionError("down"), "a/b")
    assert NOT_REACHABLE in hub_error_message(errors.OfflineModeIsEnabled("offline"), "a/b", "main")
    assert "a/b@main" in hub_error_message(errors.OfflineModeIsEnabled("offline"), "a/b", "main")
    assert hub_error_message(errors.EntryNotFoundError("x"), "a/b") == (
        "a/b has no config.json: it is not a transformers model repository"
    )
    assert hub_error_message(ConfigError("already a sentence"), "a/b") == "already a sentence"


def test_hub_errors_never_show_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEtoken123")
    message = hub_error_message(RuntimeError("401 for Bearer hf_FAKEtoken123 at /api"), "a/b")
    assert "hf_FAKEtoken123" not in message
    assert "***" in message
    assert message.startswith("could not fetch a/b from the Hugging Face Hub")
