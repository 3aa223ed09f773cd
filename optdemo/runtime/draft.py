"""Speculative decoding's draft: a small, fast model that proposes the next tokens, kept in RAM.

Two kinds (``LoadConfig.draft``): the loaded model's own int8 / int4 copy, quantized once into the
conversion cache by optdemo's CPU quantization (:mod:`optdemo.weights.quantize`) and loaded whole
on the CPU by the quantized load path, whatever the model's own placement; or a separate, smaller
model that shares the model's tokenizer (opt-125m for any OPT), loaded whole on the CPU in its own
dtype. The model then verifies what the draft proposes
(:mod:`optdemo.runtime.batching.speculative`), so the draft changes the speed, never the reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from optdemo.core.construction import construction_lock
from optdemo.core.errors import ConfigError
from optdemo.core.generation import context_window
from optdemo.core.load_config import DRAFT_COPIES, LoadConfig
from optdemo.models import hub
from optdemo.models.source import ModelSource, hub_token, resolve_model
from optdemo.plan.bandwidth import Bandwidths
from optdemo.plan.planner import Plan, resolve_dtype
from optdemo.plan.policy import DraftCosts
from optdemo.plan.speed import drafting_slowdown, predict_draft_costs
from optdemo.runtime.quantized_load import load_quantized, shard_transform
from optdemo.weights.checkpoints import ProgressCallback, quantized_checkpoint

if TYPE_CHECKING:
    from optdemo.runtime.status import ModelStatus

# The draft is loaded whole in RAM: one entry that puts every module on the CPU.
ALL_ON_CPU: dict[str, Any] = {"": "cpu"}


@dataclass
class Draft:
    """A loaded draft: the model (on the CPU), what it is, and what it cost to load."""

    model: Any
    draft: str  # "8bit" / "4bit" or the draft model's reference (LoadConfig.draft)
    display_name: str
    bytes: int  # RAM its weights take
    load_seconds: float
    window: int  # its context window: no draft beyond it
    # The plan's costs on this machine (a further token of a pass, a draft token), which the
    # engine goes by until it has measured its own (predicted_costs).
    predicted: DraftCosts | None = None

    def to_dict(self) -> dict:
        """Plain data for the benchmark's JSON."""
        return {
            "draft": self.draft,
            "display_name": self.display_name,
            "bytes": self.bytes,
            "load_seconds": round(self.load_seconds, 4),
        }


def load_draft(
    config: LoadConfig, source: ModelSource, tokenizer: Any, bar_class: Any, report: ProgressCallback
) -> Draft | None:
    """The draft ``config`` asks for, loaded whole on the CPU (None: no draft). ``tokenizer`` is
    the model's: a draft model whose vocabulary differs is refused.

    Raises:
        ConfigError: the draft model's tokenizer differs from the model's.
    """
    if config.draft == "none":
        return None
    started = time.perf_counter()
    if config.draft in DRAFT_COPIES:
        scheme = config.draft
        copy = config.with_changes(quantization=scheme, draft="none")
        transform = shard_transform(source, scheme, config.trust_remote_code)
        location = quantized_checkpoint(copy, source, transform, bar_class, report)
        report(None, f"Loading {config.display_name}'s {scheme} draft")
        model = load_quantized(location, source, scheme, ALL_ON_CPU, config.trust_remote_code)
        name = f"{config.display_name}'s {scheme} copy"
    else:
        draft_source = resolve_model(config.draft, None, config.trust_remote_code)
        name = LoadConfig(config.draft).display_name
        check_vocabulary(tokenizer, _tokenizer(draft_source, config), name, config.display_name)
        report(None, f"Loading the draft {name}")
        model = _load_model(draft_source, config)
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return Draft(model.eval(), config.draft, name, size, time.perf_counter() - started, context_window(model))


def predicted_costs(plan: Plan, status: ModelStatus, bandwidths: Bandwidths) -> DraftCosts | None:
    """What the plan predicts a further token of a verification pass and a draft token cost here,
    and how much slower the model's pass runs while the draft drafts (its ``one_pass`` is 0: the
    engine measures that before it speculates), so the engine can tell a draft that cannot pay
    before spending a pass on finding out. CPU-resident layers compute each further token unless a
    GPU runs them (``status.cpu_layers``); the slowdown comes from the memory the disk tier's split
    found (``status.disk_tier``)."""
    policy = status.cpu_layers
    costs = predict_draft_costs(plan, bandwidths, 0.0, policy is None or policy.policy == "cpu")
    tier = status.disk_tier
    if costs is None or tier is None or not tier.available_bytes:
        return costs
    where = policy.policy if policy else "accelerate"
    return replace(costs, drafting_slowdown=drafting_slowdown(plan, bandwidths, tier.available_bytes, where))


def check_vocabulary(tokenizer: Any, draft_tokenizer: Any, draft_name: str, model_name: str) -> None:
    """Refuse a draft whose tokens mean other text than the model's (another tokenizer).

    Raises:
        ConfigError: the two vocabularies differ.
    """
    if tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ConfigError(
            f"the draft {draft_name} does not share {model_name}'s tokenizer (their vocabularies "
            "differ): choose a draft of the same family (for OPT, opt-125m), a 4bit or 8bit copy, or none"
        )


def preflight_draft(config: LoadConfig, source: ModelSource) -> None:
    """Check a draft model's tokenizer against the model's before anything is dropped, when both
    are at hand without a download (a local folder, the built-in model, the Hugging Face cache);
    the load checks again in any case.

    Raises:
        ConfigError: the vocabularies differ.
    """
    if config.draft_model is None:
        return
    draft_source = resolve_model(config.draft_model, None, config.trust_remote_code)
    try:
        ours = _tokenizer(source, config, local_only=True, name=config.tokenizer)
        theirs = _tokenizer(draft_source, config, local_only=True)
    except Exception:  # noqa: BLE001 - not at hand here: the load checks once it has them
        return
    check_vocabulary(ours, theirs, LoadConfig(config.draft_model).display_name, config.display_name)


def _hub_options(source: ModelSource, config: LoadConfig, local_only: bool = False) -> dict[str, Any]:
    """What ``from_pretrained`` needs for ``source``: the token for the Hub, the cache alone offline."""
    options: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if source.kind in ("hub", "catalog"):
        options["token"] = hub_token()
        if local_only or hub.offline_reason() is not None:
            options["local_files_only"] = True
    return options


def _tokenizer(
    source: ModelSource, config: LoadConfig, local_only: bool = False, name: str | None = None
) -> Any:
    """``source``'s tokenizer (or the one ``name`` gives instead)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name or source.location, **_hub_options(source, config, local_only))


def _load_model(source: ModelSource, config: LoadConfig) -> Any:
    """The draft model whole on the CPU, in its checkpoint's dtype."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(LoadConfig(source.model), source)
    with construction_lock:
        return AutoModelForCausalLM.from_pretrained(
            source.location, dtype=dtype, device_map=None, **_hub_options(source, config)
        )
