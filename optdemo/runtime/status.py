"""What is loaded, and how a load went: the one model-status type every layer passes around.

:class:`ModelStatus` holds the facts of a loaded model (configuration, plan, where the weights
landed, timings, the disk tier, the CPU-layer policy, the latest reply's speed) and what the manager
is doing. The loader records one per load, the manager returns one from ``status()``, and a
:class:`LoadReport` is a status plus the outcome of one ``load()`` call. Their ``to_dict`` methods are
the JSON of the named API (device keys as strings: ``"0"``, ``"cpu"``, ``"disk"``); inside Python the
dataclasses themselves travel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from optdemo.core.budget import Device
from optdemo.core.generation import GenerationStats
from optdemo.core.load_config import LoadConfig
from optdemo.plan.planner import Plan, device_map_json, per_device_json
from optdemo.plan.policy import PolicyChoice, PromptKernel
from optdemo.runtime.batching.prefix_cache import CacheCounts
from optdemo.runtime.tiers.disk_map import DiskTierReport
from optdemo.runtime.timing_data import TimingReport


@dataclass(frozen=True)
class ModelStatus:
    """The loaded model's facts (``config`` None when nothing is loaded) and the manager's activity."""

    __hash__ = None  # type: ignore[assignment]  # holds dicts; compared by value, never hashed

    config: LoadConfig | None
    busy: str | None = None  # "loading opt-1.3b", "generating", or None
    plan: Plan | None = None  # the plan the model was loaded with
    device_map: dict[str, Device] = field(default_factory=dict)  # where the weights really are
    bytes_per_device: dict[Device, int] = field(default_factory=dict)  # bytes that really landed
    load_seconds: float | None = None
    disk_tier: DiskTierReport | None = None  # disk-tier weights memory-mapped by fast offloading
    checkpoint: str = ""  # where the weights were read from (the converted cache for .bin)
    cpu_layers: PolicyChoice | None = None  # with a GPU in the map: where CPU-resident layers run
    last_stats: GenerationStats | None = None  # the latest reply's measured speed
    prompt_kernel: PromptKernel | None = None  # how prompts are computed (chosen at load)
    prefix_cache: CacheCounts | None = None  # prompt caches kept for the next prompts
    timing: TimingReport | None = None  # where the latest reply's time went, per block; the pass now

    @property
    def loaded(self) -> bool:
        """Whether a model is loaded."""
        return self.config is not None

    @property
    def display_name(self) -> str | None:
        """The model's name for people, or None."""
        return self.config.display_name if self.config else None

    @property
    def model_id(self) -> str | None:
        """The loaded model's id, or None."""
        return self.config.model if self.config else None

    @property
    def plan_differences(self) -> dict[str, tuple[str, str]]:
        """Modules whose actual device differs from the planned one: name -> (planned, actual)."""
        return map_differences(self.plan.device_map, self.device_map) if self.plan else {}

    @property
    def matches_plan(self) -> bool:
        """Whether the weights went exactly where the plan said."""
        return not self.plan_differences

    def to_dict(self) -> dict:
        """The ``/status`` JSON (never includes tokens or secrets)."""
        config = self.config
        return {
            "loaded": self.loaded,
            "model": self.model_id,
            "display_name": self.display_name,
            "config": None if config is None else config_dict(config),
            "busy": self.busy,
            "load_seconds": self.load_seconds,
            "device_map": device_map_json(self.device_map),
            "bytes_per_device": per_device_json(self.bytes_per_device),
            "plan": self.plan.to_dict() if self.plan else None,
            "disk_tier": disk_tier_dict(self.disk_tier),
            "cpu_layers": policy_dict(self.cpu_layers),
            "last_generation": None if self.last_stats is None else asdict(self.last_stats),
            "prompt_kernel": None if self.prompt_kernel is None else self.prompt_kernel.to_dict(),
            "prefix_cache": None if self.prefix_cache is None else self.prefix_cache.to_dict(),
            "timing": None if self.timing is None else self.timing.to_dict(),
        }


@dataclass(frozen=True)
class LoadReport(ModelStatus):
    """The outcome of one ``ModelManager.load`` call: the loaded model's status, plus what happened."""

    __hash__ = None  # type: ignore[assignment]  # holds dicts; compared by value, never hashed

    status: str = "loaded"  # "loaded" or "reused"
    message: str = ""  # a sentence for people
    stopped_generation: bool = False  # a running reply was stopped to apply the new configuration

    @classmethod
    def of(
        cls, state: ModelStatus, status: str, message: str, stopped_generation: bool = False
    ) -> LoadReport:
        """A report on ``state`` (its fields copied as they are)."""
        facts = {f.name: getattr(state, f.name) for f in fields(ModelStatus)}
        return cls(**facts, status=status, message=message, stopped_generation=stopped_generation)

    def to_dict(self) -> dict:
        """The ``/load`` JSON."""
        assert self.config is not None, "a load report is always about a loaded model"
        return {
            "status": self.status,
            "model": self.config.model,
            "display_name": self.display_name,
            "load_seconds": round(self.load_seconds or 0.0, 4),
            "device_map": device_map_json(self.device_map),
            "bytes_per_device": per_device_json(self.bytes_per_device),
            "matches_plan": self.matches_plan,
            "plan_differences": {k: list(v) for k, v in self.plan_differences.items()},
            "message": self.message,
            "stopped_generation": self.stopped_generation,
            "disk_tier": disk_tier_dict(self.disk_tier),
            "checkpoint": self.checkpoint,
            "cpu_layers": policy_dict(self.cpu_layers),
        }


def config_dict(config: LoadConfig) -> dict:
    """The user-settable parts of a configuration as plain data."""
    return {
        "model": config.model,
        "revision": config.revision,
        "dtype": config.dtype,
        "max_memory": str(config.max_memory) if config.max_memory else None,
        "offload_folder": config.offload_folder,
        "quantization": config.quantization,
        "tokenizer": config.tokenizer,
        "draft": config.draft,
    }


def policy_dict(choice: PolicyChoice | None) -> dict | None:
    """Plain data for the CPU-layer policy (None without a GPU in the map)."""
    return None if choice is None else {"runs_on": choice.policy, "reason": choice.reason}


def disk_tier_dict(report: DiskTierReport | None) -> dict | None:
    """Plain data for a disk-tier report (None when nothing went to disk)."""
    if report is None:
        return None
    return {
        "memory_mapped_modules": report.mapped_modules,
        "memory_mapped_bytes": report.mapped_bytes,
        "streamed_blocks": report.streamed_blocks,
        "streamed_bytes": report.streamed_bytes,
        "stream_buffer_bytes": report.stream_buffer_bytes,
        "choice": report.choice,
        "available_bytes": report.available_bytes,
        "note": report.skipped_reason,
    }


def map_differences(planned: dict[str, Device], actual: dict[str, Device]) -> dict[str, tuple[str, str]]:
    """Entries where two device maps disagree: name -> (planned, actual) as strings."""
    names = list(dict.fromkeys([*planned, *actual]))
    return {
        name: (str(planned.get(name, "-")), str(actual.get(name, "-")))
        for name in names
        if planned.get(name) != actual.get(name)
    }
