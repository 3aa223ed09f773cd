"""Predicted speed: seconds per token from the bytes each tier moves and this machine's bandwidths
(:mod:`optdemo.plan.bandwidth`), under the placement the runtime will choose
(:mod:`optdemo.plan.policy`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from optdemo.plan.bandwidth import KERNELS, Bandwidths, measured_bandwidths
from optdemo.plan.policy import (
    DraftCosts,
    PolicyChoice,
    PromptKernel,
    choose_draft_length,
    choose_policy,
    choose_prompt_kernel,
    mapped_prefix,
)

if TYPE_CHECKING:
    from optdemo.plan.planner import Plan

# Eager PyTorch cost per token beyond moving weights: a fixed part per step and a part per decoder
# layer (kernel launches, hooks, Python). Rough CPU figures; they only matter for small models,
# where weights take less time than this bookkeeping.
STEP_OVERHEAD_SECONDS = 0.004
LAYER_OVERHEAD_SECONDS = 0.0004
# The share of the shorter of streaming and computing that does not overlap the longer
# (docs/BENCHMARKS.md, "Larger than RAM").
_UNHIDDEN = 0.5
# Acceptance rates (the share of drafted tokens the model agrees with) the plan predicts at:
# random weights agree differently from trained ones, so the plan shows a range.
ACCEPTANCE_RATES = (0.5, 0.7, 0.9)
# Bytes per weight of the kernels a CPU pass computes with (weights counted from bytes).
_WEIGHT_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class DraftPrediction:
    """Predicted speed with speculative decoding: plain decoding against a draft proposing k tokens
    per verification pass, at a few acceptance rates, from this machine's measured costs."""

    display_name: str  # the draft, for people
    draft_bytes: int  # RAM the draft takes
    costs: DraftCosts  # what the choice of k weighs (optdemo.plan.policy.choose_draft_length)
    plain_tokens_per_second: float
    speculative: tuple[tuple[float, int, float], ...]  # (acceptance, k chosen, tokens/s)

    def summary(self) -> str:
        """``draft opt-13b's 4bit copy (6.70 GiB in RAM): 0.9 tokens/s without it; 1.5 / 2.1 / 3.4
        at acceptance 0.5 / 0.7 / 0.9 (k 3 / 5 / 8; k 0 is plain decoding)``."""
        rates = " / ".join(f"{rate:.3g}" for _, _, rate in self.speculative)
        accept = " / ".join(f"{a:g}" for a, _, _ in self.speculative)
        ks = " / ".join(str(k) for _, k, _ in self.speculative)
        slower = ""
        if self.costs.drafting_slowdown > 1.01:
            slower = (
                f"; while it drafts, its RAM comes out of the disk tier's page cache: a pass of the model "
                f"takes {self.costs.one_pass * self.costs.drafting_slowdown:.3g} s instead of "
                f"{self.costs.one_pass:.3g} s"
            )
        return (
            f"draft {self.display_name} ({self.draft_bytes / 2**30:.2f} GiB in RAM): "
            f"{self.plain_tokens_per_second:.3g} tokens/s without it; {rates} at acceptance {accept} "
            f"(k {ks}; k 0 is plain decoding){slower}"
        )

    def to_dict(self) -> dict:
        """Plain data for the plan's JSON."""
        return {
            "draft": self.display_name,
            "draft_bytes": self.draft_bytes,
            "seconds": {
                "one_token_pass": self.costs.one_pass,
                "per_extra_token": self.costs.per_extra_token,
                "draft_token": self.costs.draft_token,
            },
            "drafting_slowdown": self.costs.drafting_slowdown,
            "plain_tokens_per_second": self.plain_tokens_per_second,
            "speculative": [
                {"acceptance": a, "k": k, "tokens_per_second": rate} for a, k, rate in self.speculative
            ],
        }


@dataclass(frozen=True)
class SpeedPrediction:
    """Predicted seconds per token, with the share of each tier."""

    seconds_per_token: float
    breakdown: dict[str, float]  # tier label -> seconds per token
    assumption: str  # what the prediction assumes (warm page cache or disk reads)
    cpu_layers: PolicyChoice | None = None  # with a GPU and offloaded layers: where they run, and why
    prompt_kernel: PromptKernel | None = None  # how prompts will be computed here, and why
    draft: DraftPrediction | None = None  # with a draft: the speed with and without it

    @property
    def tokens_per_second(self) -> float:
        """The reciprocal, for people."""
        return 1.0 / self.seconds_per_token if self.seconds_per_token else float("inf")

    def summary(self) -> str:
        """``~0.84 s/token (1.2 tokens/s), mostly disk; ...``, and with a draft its prediction."""
        main = max(self.breakdown, key=self.breakdown.get) if self.breakdown else "-"
        line = (
            f"~{self.seconds_per_token:.3g} s/token ({self.tokens_per_second:.3g} tokens/s), "
            f"mostly {main}; {self.assumption}"
        )
        return line if self.draft is None else f"{line}; {self.draft.summary()}"

    def to_dict(self) -> dict:
        """Plain JSON-friendly data for the API."""
        policy = self.cpu_layers
        return {
            "cpu_layers": None if policy is None else {"runs_on": policy.policy, "reason": policy.reason},
            "seconds_per_token": self.seconds_per_token,
            "tokens_per_second": self.tokens_per_second,
            "breakdown": self.breakdown,
            "assumption": self.assumption,
            "summary": self.summary(),
            "prompt_kernel": None if self.prompt_kernel is None else self.prompt_kernel.to_dict(),
            "draft": None if self.draft is None else self.draft.to_dict(),
        }


def plan_rate(bandwidths: Bandwidths, plan: Plan) -> float:
    """The CPU rate a plan's weights are consumed at: its dtype's; for a CPU-quantized plan the
    decoder layers' at the int8 / int4 kernel's rate, the LM head's at int8's, norms and the
    like at bfloat16's, blended by bytes. The embeddings of a quantized plan are only looked
    up (its head is a separate int8 copy), so they take no time per token."""
    if plan.quantization == "none":
        return bandwidths.cpu_rate(plan.dtype)
    layer_rate = bandwidths.cpu_rate(KERNELS[plan.quantization])
    rates = {"layer": layer_rate, "head": bandwidths.cpu_rate("int8"), "embedding": None}
    seconds = 0.0
    for block in plan.blocks:
        rate = rates.get(block.kind, bandwidths.cpu_rate("bfloat16"))
        seconds += block.bytes / rate if rate else 0.0
    total = sum(block.bytes for block in plan.blocks)
    return total / seconds if seconds else layer_rate


def predict(
    plan: Plan, bandwidths: Bandwidths, page_cache_bytes: int | None = None, cpu_layers: str = "accelerate"
) -> SpeedPrediction:
    """Seconds per token for a plan.

    GPU-resident weights are consumed at the GPU's rate; CPU-resident weights at the CPU's rate on
    a CPU-executed model, or shipped over PCIe every token when a GPU executes them (Accelerate's
    policy); disk-tier weights at the CPU's rate when the page cache can hold them
    (``page_cache_bytes``), else at the disk's read rate plus the compute.
    """
    dtype = plan.dtype
    per_device = plan.bytes_per_device
    gpus = [device for device in per_device if isinstance(device, int)]
    breakdown: dict[str, float] = {}
    cpu_rate = plan_rate(bandwidths, plan)
    gpu_rate = (bandwidths.gpu_matvec or {}).get(dtype) or 1e12
    for device in gpus:
        breakdown[f"GPU {device}"] = per_device[device] / gpu_rate
    resident = per_device.get("cpu", 0)
    disk = per_device.get("disk", 0)
    if gpus and bandwidths.host_to_device and cpu_layers in ("gpu", "accelerate"):
        # Offloaded layers executed on the GPU: their weights cross PCIe every token, resident ones
        # from pinned memory under the prefetcher, everything from pageable memory under Accelerate.
        resident_rate = bandwidths.pinned_rate if cpu_layers == "gpu" else bandwidths.host_to_device
        breakdown["CPU→GPU transfers"] = resident / resident_rate + disk / bandwidths.host_to_device
    else:
        breakdown["CPU"] = resident / cpu_rate
    breakdown["overhead"] = STEP_OVERHEAD_SECONDS + LAYER_OVERHEAD_SECONDS * len(plan.layers)
    assumption = "weights in RAM"
    if disk:
        on_cpu = not gpus or cpu_layers == "cpu"
        sizes = [block.bytes for block in plan.blocks if block.device == "disk"] or [disk]
        available = None if page_cache_bytes is None else page_cache_bytes + resident
        kept = len(sizes) if available is None else mapped_prefix(sizes, available, resident)
        kept = 0 if plan.disk_tier == "stream" else kept
        if not gpus and plan.disk_tier != "accelerate" and kept < len(sizes):
            assumption = _predict_streamed(plan, bandwidths, sizes, kept, breakdown)
        elif kept == len(sizes) and plan.disk_tier != "stream":
            assumption = "disk layers served from the page cache after the first token"
            if on_cpu:
                breakdown["disk (page cache)"] = disk / cpu_rate
        else:
            assumption = "disk layers re-read from disk every token (RAM cannot cache them)"
            breakdown["disk reads"] = disk / bandwidths.disk_read + (disk / cpu_rate if on_cpu else 0)
    return SpeedPrediction(sum(breakdown.values()), breakdown, assumption)


def _predict_streamed(
    plan: Plan, bandwidths: Bandwidths, sizes: list[int], kept: int, breakdown: dict
) -> str:
    """The streamed disk tier (:mod:`optdemo.runtime.tiers.disk_stream`): the first ``kept`` disk blocks stay
    mapped (cached), the rest are read from disk every token while other blocks compute; a share
    (``_UNHIDDEN``) of the shorter of reading and computing does not hide behind the longer. Fills
    ``breakdown``; returns the assumption."""
    mapped = sum(sizes[:kept])
    streamed = sum(sizes) - mapped
    breakdown["disk (computed)"] = sum(sizes) / plan_rate(bandwidths, plan)
    computing = sum(breakdown.values())
    reading = streamed / bandwidths.disk_read
    # Time per token: the longer of the two plus the unhidden half of the shorter; the breakdown
    # already holds the computing part.
    breakdown["disk reads (streamed)"] = (
        max(reading, computing) + _UNHIDDEN * min(reading, computing) - computing
    )
    return (
        f"{mapped / 2**30:.2f} GiB of the disk tier cached, {streamed / 2**30:.2f} GiB streamed from "
        "disk every token"
    )


def predict_plan(plan: Plan, ram_available_bytes: int) -> SpeedPrediction:
    """The prediction for a plan on this machine, with the CPU-layer policy it would get, measuring
    this machine's bandwidths first if they are not cached yet."""
    per_device = plan.bytes_per_device
    cpu_bytes = per_device.get("cpu", 0)
    bandwidths = measured_bandwidths()
    policy = None
    if any(isinstance(device, int) for device in per_device):
        disk = per_device.get("disk", 0)
        policy = choose_policy(cpu_bytes, disk, plan.dtype, bandwidths, plan.cpu_layers)
    prediction = predict(
        plan, bandwidths, max(0, ram_available_bytes - cpu_bytes), policy.policy if policy else "accelerate"
    )
    cpu_executes = policy is None or policy.policy == "cpu"
    slowdown = drafting_slowdown(
        plan, bandwidths, ram_available_bytes, policy.policy if policy else "accelerate"
    )
    return replace(
        prediction,
        cpu_layers=policy,
        prompt_kernel=choose_prompt_kernel(plan.dtype, bandwidths),
        draft=predict_draft(plan, bandwidths, prediction.seconds_per_token, cpu_executes, slowdown),
    )


def drafting_slowdown(plan: Plan, bandwidths: Bandwidths, ram_available_bytes: int, cpu_layers: str) -> float:
    """How much slower the model's pass runs while its draft drafts (1.0 without a draft or a disk
    tier): the draft's RAM is then out of the page cache that holds the disk tier."""
    cpu_bytes = plan.bytes_per_device.get("cpu", 0)
    if plan.draft is None or not plan.bytes_per_device.get("disk"):
        return 1.0
    alone = predict(plan, bandwidths, max(0, ram_available_bytes - cpu_bytes), cpu_layers).seconds_per_token
    room = max(0, ram_available_bytes - cpu_bytes - plan.draft.bytes)
    return max(1.0, predict(plan, bandwidths, room, cpu_layers).seconds_per_token / alone)


def predict_draft(
    plan: Plan, bandwidths: Bandwidths, one_pass: float, cpu_executes: bool = True, slowdown: float = 1.0
) -> DraftPrediction | None:
    """The speed with the plan's draft (None without one), from :func:`predict_draft_costs` and
    the model's pass ``slowdown`` while the draft drafts (:func:`drafting_slowdown`); the draft
    length at each acceptance rate is the one the engine would choose
    (:func:`~optdemo.plan.policy.choose_draft_length`)."""
    costs = predict_draft_costs(plan, bandwidths, one_pass, cpu_executes)
    if costs is None or plan.draft is None:
        return None
    costs = replace(costs, drafting_slowdown=slowdown)
    speculative = tuple((a, *choose_draft_length(costs, a)) for a in ACCEPTANCE_RATES)
    return DraftPrediction(plan.draft.display_name, plan.draft.bytes, costs, 1.0 / one_pass, speculative)


def predict_draft_costs(
    plan: Plan, bandwidths: Bandwidths, one_pass: float, cpu_executes: bool = True
) -> DraftCosts | None:
    """What speculation costs with the plan's draft on this machine (None without one): a pass over
    k + 1 tokens reads the weights once, as a pass over one token does (``one_pass``), and computes
    each further token: on the CPU, the weights it executes at the rate of a prompt-sized product
    plus each layer's bookkeeping (on a GPU, only the bookkeeping); the draft's token costs its
    bytes at its kernel's rate. The engine starts from these until it has measured its own."""
    draft = plan.draft
    if draft is None:
        return None
    executed = plan.bytes_per_device.get("cpu", 0) + plan.bytes_per_device.get("disk", 0)
    kernel = KERNELS.get(plan.quantization, plan.dtype)
    prompt_rate = bandwidths.prompt_matmul.get(plan.dtype) or bandwidths.prompt_matmul.get("bfloat16")
    compute = 0.0
    if cpu_executes and executed:
        flops = 2 * executed / _WEIGHT_BYTES.get(kernel, 2.0)
        # Unmeasured prompt rate: assume each further token costs what a whole pass computes.
        compute = flops / prompt_rate if prompt_rate else executed / plan_rate(bandwidths, plan)
    return DraftCosts(
        one_pass,
        compute + LAYER_OVERHEAD_SECONDS * len(plan.layers),
        draft.bytes / bandwidths.cpu_rate(draft.kernel)
        + STEP_OVERHEAD_SECONDS
        + LAYER_OVERHEAD_SECONDS * draft.layers,
    )
