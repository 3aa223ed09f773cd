"""The load configuration: everything that decides which weights are loaded and where they go.

A :class:`LoadConfig` is frozen and normalised on creation (``opt-1.3b`` becomes
``facebook/opt-1.3b``, a local path becomes absolute, the budget is parsed), so that equality means
"the same load": the model manager reuses the loaded model exactly when the new configuration equals
the current one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from huggingface_hub.utils import HFValidationError, validate_repo_id

from optdemo.core.budget import MemoryBudget, parse_max_memory
from optdemo.core.catalog import TINY_MODEL_ID, catalog_entry
from optdemo.core.defaults import CPU_LAYER_POLICIES, DEFAULT_CPU_LAYERS, DEFAULT_DISK_TIER, DISK_TIER_MODES
from optdemo.core.errors import ConfigError

DTYPES = ("auto", "float16", "bfloat16", "float32")
QUANTIZATIONS = ("none", "8bit", "4bit")
# A draft for speculative decoding: none, the model's own int8 / int4 copy, or another model's id.
DRAFT_COPIES = ("8bit", "4bit")
MAX_MODEL_CHARS = 300
_REVISION_RE = re.compile(r"^[\w./-]{1,200}$")


@dataclass(frozen=True)
class LoadConfig:
    """What to load and how: compared for equality to decide reuse versus reload."""

    # Hub repository id ("facebook/opt-1.3b"), catalog short name ("opt-1.3b"), the built-in
    # "optdemo/tiny-opt", or a local directory holding config.json and weights.
    model: str
    # Branch, tag or commit on the Hub; None means the repository's default branch.
    revision: str | None = None
    # Weight dtype; "auto" keeps the checkpoint's own (float16 for the OPT family).
    dtype: str = "auto"
    # Bytes per device; None lets Accelerate measure free memory, as device_map="auto" alone does.
    max_memory: MemoryBudget | None = None
    # Where layers that fit neither GPU nor CPU budget are written; needed when any go to disk.
    offload_folder: str | None = None
    # bitsandbytes quantization of Linear weights: "none", "8bit" or "4bit" (CUDA only).
    quantization: str = "none"
    # A different tokenizer (repo id or directory); None uses the model's own. transformers 5 has
    # one (Rust) tokenizer implementation, so the original scripts' use_fast=False has no meaning.
    tokenizer: str | None = None
    # Never on by default: it executes code from the model repository.
    trust_remote_code: bool = False
    # optdemo's offloading: disk-tier weights memory-mapped instead of re-read on every forward, and
    # .bin checkpoints converted once to safetensors in a cache. False: plain Accelerate behaviour.
    fast_offload: bool = True
    # With a GPU in the map, where offloaded layers run: "auto" (the faster by prediction; the
    # default since measured on a GPU), "accelerate" (Accelerate's own synchronous transfers),
    # "gpu" (weights prefetched from pinned memory) or "cpu" (activations cross).
    cpu_layers: str = DEFAULT_CPU_LAYERS
    # On a CPU-executed model, how the disk tier is served: "auto" (memory-mapped where the memory
    # available can cache it, streamed past the page cache where it cannot), "map" or "stream".
    disk_tier: str = DEFAULT_DISK_TIER
    # Speculative decoding's draft: "none"; "8bit" / "4bit", the model's own quantized copy (made
    # once in the conversion cache, kept in RAM); or a smaller model sharing the tokenizer (a repo
    # id, catalog name or folder, normalised like ``model``). The output stays the model's own.
    draft: str = "none"
    # Not part of equality: a cosmetic label for the UI is not a different load.
    label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", normalize_model(self.model))
        if self.revision is not None:
            revision = str(self.revision).strip()
            if revision and (not _REVISION_RE.match(revision) or ".." in revision):
                raise ConfigError(f"revision {revision[:60]!r} is not a branch, tag or commit name")
            object.__setattr__(self, "revision", revision or None)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization {self.quantization!r} is not supported: choose one of "
                f"{', '.join(QUANTIZATIONS)}"
            )
        if self.max_memory is not None and not isinstance(self.max_memory, MemoryBudget):
            object.__setattr__(self, "max_memory", parse_max_memory(self.max_memory))
        if self.offload_folder is not None:
            folder = str(self.offload_folder).strip()
            object.__setattr__(
                self, "offload_folder", os.path.abspath(os.path.expanduser(folder)) if folder else None
            )
        if self.tokenizer is not None:
            tokenizer = str(self.tokenizer).strip()
            object.__setattr__(self, "tokenizer", normalize_model(tokenizer) if tokenizer else None)
        if not isinstance(self.trust_remote_code, bool):
            raise ConfigError("trust_remote_code must be true or false")
        if self.cpu_layers not in CPU_LAYER_POLICIES:
            choices = ", ".join(CPU_LAYER_POLICIES)
            raise ConfigError(f"cpu_layers {self.cpu_layers!r} is not supported: choose one of {choices}")
        if self.disk_tier not in DISK_TIER_MODES:
            choices = ", ".join(DISK_TIER_MODES)
            raise ConfigError(f"disk_tier {self.disk_tier!r} is not supported: choose one of {choices}")
        if not isinstance(self.fast_offload, bool):
            raise ConfigError("fast_offload must be true or false")
        object.__setattr__(self, "draft", normalize_draft(self.draft))
        if self.draft in DRAFT_COPIES and self.draft == self.quantization:
            raise ConfigError(
                f"the model is loaded {self.draft} already, so its {self.draft} copy would draft "
                "exactly what it computes: choose another draft or none"
            )

    @property
    def draft_model(self) -> str | None:
        """The separate model that drafts (its normalised reference), or None (no draft, or the
        model's own quantized copy)."""
        return None if self.draft in ("none", *DRAFT_COPIES) else self.draft

    @property
    def cpu_layers_in_force(self) -> str:
        """The CPU-layer policy a load applies: plain Accelerate whenever fast offloading is off."""
        return self.cpu_layers if self.fast_offload else "accelerate"

    def with_changes(self, **changes: object) -> LoadConfig:
        """A copy with some fields changed (normalised and validated again)."""
        return replace(self, **changes)

    @property
    def display_name(self) -> str:
        """Short name for people: ``opt-1.3b``, ``tiny-opt``, or the repo id / folder name."""
        if self.label:
            return self.label
        entry = catalog_entry(self.model)
        if entry is not None:
            return entry.name
        return self.model.rstrip("/").rsplit("/", 1)[-1]


def normalize_draft(draft: object) -> str:
    """A draft's canonical form: ``none`` (also for empty or None), ``8bit``, ``4bit``, or a model
    reference normalised as :func:`normalize_model` does.

    Raises:
        ConfigError: not text, or neither a copy scheme nor a model reference.
    """
    if draft is None:
        return "none"
    if not isinstance(draft, str):
        raise ConfigError(f"draft must be text (none, 8bit, 4bit or a model id), not {type(draft).__name__}")
    text = draft.strip()
    if text.lower() in ("", "none"):
        return "none"
    if text.lower() in DRAFT_COPIES:
        return text.lower()
    try:
        return normalize_model(text)
    except ConfigError as exc:
        raise ConfigError(f"draft model: {exc}") from None


def normalize_model(model: str) -> str:
    """Canonical form of a model reference: catalog names get their ``facebook/`` repo id, local
    directories become absolute paths, Hub ids are checked for shape.

    Raises:
        ConfigError: empty, too long, or neither an existing directory nor a valid repo id.
    """
    if not isinstance(model, str) or not model.strip():
        raise ConfigError("no model given: pick an OPT size, the tiny model, a Hub id or a folder")
    model = model.strip()
    if len(model) > MAX_MODEL_CHARS:
        raise ConfigError(f"model name is {len(model)} characters long: that is not a model id")
    if model.lower() in (TINY_MODEL_ID, "tiny-opt"):
        return TINY_MODEL_ID
    entry = catalog_entry(model)
    if entry is not None:
        return entry.repo_id
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if model.startswith((".", "/", "~")) or model.endswith("/") or "\\" in model:
        raise ConfigError(
            f"model folder {model!r} does not exist: give a directory with config.json, "
            "or a Hugging Face repo id such as facebook/opt-1.3b"
        )
    try:
        validate_repo_id(model)  # the Hub's own rules: "name" or "owner/name", no "..", no "--"
    except HFValidationError:
        raise ConfigError(
            f"{model!r} is neither a local folder nor a Hugging Face repo id (owner/name)"
        ) from None
    return model
