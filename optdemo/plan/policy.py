"""The placement decisions, in one place: the speed prediction and the runtime both decide with
these functions, so a plan predicts exactly what a load then does (FlexGen's one ``Policy``).

* the disk tier of a CPU-executed model: which blocks stay memory-mapped (the page cache keeps
  them) and which are streamed past the page cache (:func:`split_disk_tier`);
* with a GPU in the map, where offloaded layers run: on the GPU with their weights crossing PCIe
  (from pageable memory as plain Accelerate, or pinned and copied ahead) or on the CPU
  (:func:`choose_policy`);
* whether a CPU-only machine quantizes with optdemo's own kernels (:func:`cpu_quantization`);
* which kernel computes prompts (:func:`choose_prompt_kernel`);
* how many tokens a draft proposes per verification pass (:func:`choose_draft_length`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from optdemo.core.defaults import STREAM_DEPTH
from optdemo.plan.bandwidth import FLOAT16_IN_FLOAT32, Bandwidths

if TYPE_CHECKING:
    from optdemo.core.load_config import LoadConfig
    from optdemo.system.hardware import Hardware

# Memory left free beside the mapped part of the disk tier (activations, the allocator, other
# programs' pages): a twentieth of what is available, at least this much. Mapping to the last byte
# makes the kernel evict mapped pages every token, which costs more than streaming a little more
# (docs/BENCHMARKS.md, "Larger than RAM").
HEADROOM_BYTES = 256 * 2**20
HEADROOM_SHARE = 0.05


def mapped_prefix(sizes: list[int], available: int, cpu_tier: int) -> int:
    """How many disk blocks (in execution order, of ``sizes`` bytes) stay memory-mapped: all when
    the memory ``available`` can cache them beside the CPU tier and the headroom; else as many as
    fit beside the stream buffers too."""
    room = available - cpu_tier - max(HEADROOM_BYTES, int(available * HEADROOM_SHARE))
    if sum(sizes) <= room:
        return len(sizes)
    room -= STREAM_DEPTH * max(sizes, default=0)
    count = used = 0
    for size in sizes:
        if used + size > room:
            break
        count, used = count + 1, used + size
    return count


def split_disk_tier(sizes: list[int], mode: str, available: int | None, cpu_tier: int = 0) -> tuple[int, str]:
    """How many disk blocks (a prefix, in execution order) stay mapped, and a sentence saying why:
    ``mode`` "map" or "stream" forces one; "auto" keeps what the memory ``available`` can cache
    beside the CPU tier, a little headroom and the stream buffers."""
    total = sum(sizes)
    if mode == "map":
        return len(sizes), "mapped: chosen in the configuration"
    if mode == "stream":
        return 0, "streamed: chosen in the configuration"
    assert available is not None, "auto needs the memory available"
    kept = mapped_prefix(sizes, available, cpu_tier)
    if kept == len(sizes):
        return kept, f"mapped: the page cache can hold all {_gib(total)} ({_gib(available)} available)"
    used = sum(sizes[:kept])
    return kept, (
        f"{_gib(used)} mapped, {_gib(total - used)} streamed: only {_gib(available)} of memory is "
        f"available for the {_gib(total)} disk tier"
    )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


_POLICY_REASONS = {
    "accelerate": "plain Accelerate: offloaded weights cross PCIe from pageable memory every token",
    "gpu": "weights cross PCIe from pinned memory, the next block copied while one computes",
    "cpu": "offloaded layers compute on the CPU; only activations cross PCIe",
}


@dataclass(frozen=True)
class PolicyChoice:
    """The policy for offloaded layers with a GPU in the map, with each policy's predicted seconds
    per token (None where unknown: no GPU measured)."""

    policy: str  # "accelerate", "gpu" or "cpu"
    gpu_seconds: float | None
    cpu_seconds: float | None
    reason: str
    accelerate_seconds: float | None = None


def choose_policy(
    resident_bytes: int, disk_bytes: int, dtype: str, bandwidths: Bandwidths, requested: str = "auto"
) -> PolicyChoice | None:
    """Where offloaded layers run: ``requested`` when it names a policy; for ``auto`` the faster
    by prediction of moving their weights over PCIe (``gpu``: resident bytes from pinned memory,
    disk bytes through Accelerate) and consuming all of them on the CPU (``cpu``). None when
    nothing is offloaded (there is nothing to decide)."""
    if resident_bytes + disk_bytes <= 0:
        return None
    pageable, pinned = bandwidths.host_to_device, bandwidths.pinned_rate
    accelerate_s = (resident_bytes + disk_bytes) / pageable if pageable else None
    gpu_s = resident_bytes / pinned + disk_bytes / pageable if pageable and pinned else None
    cpu_s = (resident_bytes + disk_bytes) / bandwidths.cpu_rate(dtype)
    if requested in _POLICY_REASONS:
        policy = requested
        why = "chosen in the configuration"
    else:
        policy = "cpu" if gpu_s is None or cpu_s <= gpu_s else "gpu"
        why = "predicted faster from this machine's measured bandwidths"
    return PolicyChoice(policy, gpu_s, cpu_s, f"{_POLICY_REASONS[policy]} ({why})", accelerate_s)


def cpu_quantization(config: LoadConfig, hardware: Hardware) -> str:
    """The scheme :mod:`optdemo.weights.quantize` applies (``8bit``/``4bit``): quantization asked for
    on a machine without a GPU, planned for this machine (a budget naming no GPU). "none" otherwise:
    with a GPU, bitsandbytes quantizes at load time."""
    if config.quantization == "none" or hardware.gpu_count:
        return "none"
    if config.max_memory is not None and config.max_memory.gpu_indices:
        return "none"
    return config.quantization


# How prompts are computed: the load dtype's own kernel, or (float16 weights) in float32.
NATIVE_KERNEL = "native"
FLOAT32_KERNEL = "float32"


@dataclass(frozen=True)
class PromptKernel:
    """The kernel prompts are computed with, and why (the measured rates)."""

    kernel: str  # NATIVE_KERNEL or FLOAT32_KERNEL
    reason: str
    speedup: float = 1.0  # against the load dtype's own kernel, as measured

    def to_dict(self) -> dict:
        """Plain data for the plan's JSON."""
        return {"kernel": self.kernel, "reason": self.reason, "speedup": round(self.speedup, 2)}


def choose_prompt_kernel(dtype: str, bandwidths: Bandwidths) -> PromptKernel:
    """The fastest way to compute a prompt whose results are at least as exact as the load dtype's
    own kernel: for float16 weights, float32 products (exact float16 inputs, float32 sums, rounded
    once) when this CPU runs them faster than its float16 products; the dtype's own kernel
    otherwise (bfloat16 and float32 have no faster exact alternative)."""
    rates = bandwidths.prompt_matmul
    if dtype == "float16" and rates.get(FLOAT16_IN_FLOAT32, 0) > rates.get("float16", float("inf")):
        speedup = rates[FLOAT16_IN_FLOAT32] / rates["float16"]
        return PromptKernel(
            FLOAT32_KERNEL,
            f"prompts: float16 weights computed in float32, {speedup:.1f}x float16's own kernel on "
            "this CPU, never less exact",
            speedup,
        )
    return PromptKernel(NATIVE_KERNEL, f"prompts: {dtype}'s own kernel (the fastest exact one here)")


# Speculative decoding: the most tokens a draft proposes per verification pass, and how much faster
# than plain decoding a draft length must be predicted to run before it is used (measured costs
# are noisy; a draft that only ties with plain decoding is not worth its risk).
MAX_DRAFT_LENGTH = 8
SPECULATION_MARGIN = 1.05


@dataclass(frozen=True)
class DraftCosts:
    """What speculative decoding costs, in seconds: the model's pass over one token, each further
    token in the same pass (nearly nothing where reading the weights dominates, as on a disk tier;
    nearly a whole pass where computing does, as in RAM on a CPU), and one token of the draft; and
    how much slower the model's pass runs while the draft drafts (above 1 where the draft's RAM
    comes out of the page cache that holds the disk tier: idle, its pages make way; drafting, the
    model's do)."""

    one_pass: float
    per_extra_token: float
    draft_token: float
    drafting_slowdown: float = 1.0

    def pass_seconds(self, k: int) -> float:
        """Seconds of one speculative pass: ``k`` draft tokens, then the model's pass over k + 1."""
        if k == 0:
            return self.one_pass
        return k * self.draft_token + self.one_pass * self.drafting_slowdown + k * self.per_extra_token


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one pass yields on average when each drafted token is accepted with probability
    ``acceptance`` until the first rejection: the accepted ones plus the model's own token
    ``(1 - a^(k+1)) / (1 - a)``."""
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def choose_draft_length(
    costs: DraftCosts, acceptance: float, max_k: int = MAX_DRAFT_LENGTH
) -> tuple[int, float]:
    """The draft length k in 0..``max_k`` with the most expected tokens per second, and that rate;
    k = 0 (plain decoding, one token per pass) unless some k beats it by ``SPECULATION_MARGIN``."""
    plain = 1.0 / costs.one_pass if costs.one_pass > 0 else float("inf")
    best_k, best_rate = 0, plain
    for k in range(1, max(0, max_k) + 1):
        rate = expected_tokens(acceptance, k) / costs.pass_seconds(k)
        if rate > best_rate and rate >= plain * SPECULATION_MARGIN:
            best_k, best_rate = k, rate
    return best_k, best_rate
