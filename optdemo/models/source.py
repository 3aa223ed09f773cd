"""Resolve a model reference to where its weights come from and to its configuration.

Sources, in order: the built-in tiny model (built locally on first use), the offline OPT catalog,
a local directory, and the Hugging Face Hub, from which only ``config.json`` is fetched here (never
weights). Hub failures become :class:`~optdemo.core.errors.ConfigError` / ``LoadError`` messages that say
what to do; the HF token is taken from ``HF_TOKEN`` or the huggingface_hub login and never shown.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from optdemo.core.catalog import TINY_MODEL_ID, CatalogEntry, catalog_config_dict, catalog_entry
from optdemo.core.errors import ConfigError, OptdemoError
from optdemo.core.redact import redact
from optdemo.models import hub
from optdemo.models.synthetic import ensure_tiny_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, with its configuration (read without any weights)."""

    model: str  # the normalised reference from LoadConfig.model
    kind: str  # "builtin", "catalog", "local" or "hub"
    location: str  # what from_pretrained receives: a repo id or a directory
    config: PretrainedConfig = field(compare=False, repr=False)
    catalog: CatalogEntry | None = None


_cache: dict[tuple[str, str | None, bool], ModelSource] = {}
_cache_lock = threading.Lock()


def hub_token() -> str | None:
    """The Hugging Face token from ``HF_TOKEN`` or ``hf auth login``; never log or return it."""
    from huggingface_hub import get_token

    return get_token()


def resolve_model(model: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelSource:
    """Find where ``model`` lives and read its configuration, without touching weights.

    Args:
        model: a normalised reference (see :func:`optdemo.core.load_config.normalize_model`).
        revision: Hub branch, tag or commit (ignored for local and built-in models).
        trust_remote_code: allow configurations whose code lives in the repository.

    Raises:
        ConfigError: the model cannot be found, reached, or is not a causal language model.
    """
    key = (model, revision, trust_remote_code)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    source = _resolve_uncached(model, revision, trust_remote_code)
    _check_causal_lm(source)
    with _cache_lock:
        _cache[key] = source
    return source


def _resolve_uncached(model: str, revision: str | None, trust_remote_code: bool) -> ModelSource:
    from transformers import AutoConfig

    if model == TINY_MODEL_ID:
        path = str(ensure_tiny_model())
        return ModelSource(model, "builtin", path, AutoConfig.from_pretrained(path))
    entry = catalog_entry(model)
    if entry is not None and revision is None:
        # The shipped config equals the Hub's, so planning needs no network; loading uses the Hub.
        fields = catalog_config_dict(entry.name)
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(
            model_type, **{k: v for k, v in fields.items() if not k.startswith("_")}
        )
        return ModelSource(model, "catalog", entry.repo_id, config, entry)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ConfigError(f"folder {model} has no config.json: it is not a saved Hugging Face model")
        return ModelSource(model, "local", model, _read_config(model, trust_remote_code, model))
    return ModelSource(model, "hub", model, _fetch_hub_config(model, revision, trust_remote_code), entry)


def _fetch_hub_config(repo_id: str, revision: str | None, trust_remote_code: bool) -> PretrainedConfig:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    reason = hub.offline_reason()
    if reason is not None:  # answer from the cache at once rather than retry for 23 s
        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        if not isinstance(cached, str):
            where = f"{repo_id}@{revision}" if revision else repo_id
            raise ConfigError(hub.unreachable_message(repo_id, where, reason))
        return _read_config(os.path.dirname(cached), trust_remote_code, repo_id)
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, token=hub_token())
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes a message a user can act on
        if hub.is_network_error(exc):
            hub.mark_unreachable(exc)
        raise ConfigError(hub_error_message(exc, repo_id, revision)) from None
    return _read_config(os.path.dirname(path), trust_remote_code, repo_id)


def _read_config(path: str, trust_remote_code: bool, name: str) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ConfigError(
                f"{name} needs code from its repository (trust_remote_code), which optdemo only "
                "runs when you start it with that explicitly allowed"
            ) from None
        raise ConfigError(f"cannot read the configuration of {name}: {exc}") from None
    except (OSError, KeyError) as exc:
        raise ConfigError(f"cannot read the configuration of {name}: {exc}") from None


def _check_causal_lm(source: ModelSource) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(source.config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(
        source.config, "auto_map", None
    ):
        kind = getattr(source.config, "model_type", "unknown")
        raise ConfigError(
            f"{source.model} is a {kind} model, not a causal language model: optdemo can only "
            "chat with text-generation models such as OPT"
        )


def hub_error_message(exc: BaseException, repo_id: str, revision: str | None = None) -> str:
    """Turn a huggingface_hub / network exception into a sentence that says what to do."""
    from huggingface_hub import errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    if isinstance(exc, errors.GatedRepoError):
        return (
            f"{where} is gated: accept its licence on huggingface.co, then set HF_TOKEN or run "
            "'hf auth login' before starting optdemo"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"revision {revision!r} does not exist in {repo_id}: use a branch, tag or commit it has"
    if isinstance(exc, errors.RepositoryNotFoundError):
        typo = hub.typo_message(repo_id)
        if typo is not None:
            return typo
        return (
            f"{repo_id} was not found on the Hugging Face Hub (or it is private): check the name, "
            "or set HF_TOKEN if it is yours"
        )
    if isinstance(exc, errors.LocalEntryNotFoundError) or hub.is_network_error(exc):
        return hub.unreachable_message(repo_id, where, hub.offline_reason_if_known())
    if isinstance(exc, errors.EntryNotFoundError):
        return f"{where} has no config.json: it is not a transformers model repository"
    if isinstance(exc, OptdemoError):
        return str(exc)
    return f"could not fetch {where} from the Hugging Face Hub: {redact(str(exc))}"
