"""Predicted speed: seconds per token from the bytes each tier moves and this machine's bandwidths.

Decoding one token reads every weight once, so for a model too big for its GPU the time per
token is close to ``sum(bytes on tier / bandwidth of tier)``. The bandwidths are measured once on
this machine (a few seconds) and cached in ``$OPTDEMO_CACHE/bandwidths.json``:

* CPU matrix-vector speed per dtype (weight bytes per second that ``x @ W.T`` consumes),
* disk read speed at the offload/cache folder with the page cache dropped,
* host-to-device copy speed and GPU matrix-vector speed when a GPU is present.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from optdemo.core.paths import cache_dir
from optdemo.runtime.tiers.disk_map import mapped_prefix

if TYPE_CHECKING:
    from optdemo.plan.planner import Plan

_PROBE_WEIGHT_BYTES = 64 * 2**20  # the probe weight: big enough to leave the CPU caches, as layers do
_DISK_PROBE_BYTES = 128 * 2**20
_DISK_PROBE_READ = 16 * 2**20  # per read: large, sequential, like the streamer's block reads
_lock = threading.Lock()
_KERNELS = {"8bit": "int8", "4bit": "int4"}  # quantization scheme -> its cpu_matvec entry
# Eager PyTorch + generate() cost per token beyond moving weights: a fixed part per step and a part
# per decoder layer (kernel launches, hooks, Python). Rough CPU figures; they only matter for small
# models, where weights take less time than this bookkeeping.
STEP_OVERHEAD_SECONDS = 0.004
# The share of the shorter of streaming and computing that does not overlap the longer (measured).
_UNHIDDEN = 0.5
LAYER_OVERHEAD_SECONDS = 0.0004


@dataclass(frozen=True)
class Bandwidths:
    """Bytes per second this machine moves or consumes, per tier (None: no such tier)."""

    # dtype name -> weight bytes/s for a batch-1 linear layer on CPU; "int8" / "int4": the bytes of
    # optdemo.weights.quantize's layers (weights and scales) through torch's weight-only kernels.
    cpu_matvec: dict[str, float]
    disk_read: float
    host_to_device: float | None = None  # from pageable memory, as Accelerate's hooks copy
    gpu_matvec: dict[str, float] | None = None
    host_to_device_pinned: float | None = None  # from pinned memory, as the prefetcher copies
    # How disk_read was measured: "direct" (O_DIRECT, past the page cache, as the disk tier's
    # streamer reads), "buffered" where the file system has no O_DIRECT; "" in caches written
    # before optdemo said (buffered reads of a fresh file, which a virtual disk's host cache
    # flatters: 6-8 GB/s here against 3-4 for the streamer), measured again.
    disk_probe: str = ""

    def cpu_rate(self, dtype: str) -> float:
        """CPU weight-consumption rate for ``dtype`` (float32's when unmeasured)."""
        return self.cpu_matvec.get(dtype) or self.cpu_matvec["float32"]

    def plan_rate(self, plan: Plan) -> float:
        """The CPU rate a plan's weights are consumed at: its dtype's; for a CPU-quantized plan the
        decoder layers' at the int8 / int4 kernel's rate, the LM head's at int8's, norms and the
        like at bfloat16's, blended by bytes. The embeddings of a quantized plan are only looked
        up (its head is a separate int8 copy), so they take no time per token."""
        if plan.quantization == "none":
            return self.cpu_rate(plan.dtype)
        layer_rate = self.cpu_rate(_KERNELS[plan.quantization])
        rates = {"layer": layer_rate, "head": self.cpu_rate("int8"), "embedding": None}
        seconds = 0.0
        for block in plan.blocks:
            rate = rates.get(block.kind, self.cpu_rate("bfloat16"))
            seconds += block.bytes / rate if rate else 0.0
        total = sum(block.bytes for block in plan.blocks)
        return total / seconds if seconds else layer_rate

    @property
    def pinned_rate(self) -> float | None:
        """Host-to-device bytes/s from pinned memory (the pageable rate when not measured)."""
        return self.host_to_device_pinned or self.host_to_device


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


@dataclass(frozen=True)
class SpeedPrediction:
    """Predicted seconds per token, with the share of each tier."""

    seconds_per_token: float
    breakdown: dict[str, float]  # tier label -> seconds per token
    assumption: str  # what the prediction assumes (warm page cache or disk reads)
    cpu_layers: PolicyChoice | None = None  # with a GPU and offloaded layers: where they run, and why

    @property
    def tokens_per_second(self) -> float:
        """The reciprocal, for people."""
        return 1.0 / self.seconds_per_token if self.seconds_per_token else float("inf")

    def summary(self) -> str:
        """``~0.84 s/token (1.2 tokens/s), mostly disk``."""
        main = max(self.breakdown, key=self.breakdown.get) if self.breakdown else "-"
        return (
            f"~{self.seconds_per_token:.3g} s/token ({self.tokens_per_second:.3g} tokens/s), "
            f"mostly {main}; {self.assumption}"
        )

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
        }


def bandwidths_path() -> Path:
    """Where measured bandwidths are cached."""
    return cache_dir() / "bandwidths.json"


def measured_bandwidths(refresh: bool = False, disk_folder: str | None = None) -> Bandwidths:
    """This machine's bandwidths, measured once (a few seconds) and then read from the cache."""
    path = bandwidths_path()
    with _lock:
        if path.exists() and not refresh:
            try:
                result = Bandwidths(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                result = None  # an old or damaged file: measure again
            fresh = result is not None and all(kind in result.cpu_matvec for kind in _KERNELS.values())
            if fresh and result.disk_probe:
                return result
            if result is not None:  # measured before the quantized kernels or the direct disk probe
                if not fresh:
                    result.cpu_matvec.update(_quantized_rates())
                if not result.disk_probe:
                    rate, method = _disk_read_rate(disk_folder or str(cache_dir()))
                    result = replace(result, disk_read=rate, disk_probe=method)
                path.write_text(json.dumps(asdict(result), indent=2))
                return result
        result = measure_bandwidths(disk_folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(result), indent=2))
        return result


def measure_bandwidths(disk_folder: str | None = None) -> Bandwidths:
    """Measure the bandwidths now (see the module docstring)."""
    import torch

    cpu = {name: _matvec_rate(getattr(torch, name), "cpu") for name in ("float32", "float16", "bfloat16")}
    cpu.update(_quantized_rates())
    h2d = pinned = gpu = None
    if torch.cuda.is_available():
        h2d = _host_to_device_rate(pinned=False)
        pinned = _host_to_device_rate(pinned=True)
        gpu = {
            name: _matvec_rate(getattr(torch, name), "cuda") for name in ("float32", "float16", "bfloat16")
        }
    disk, method = _disk_read_rate(disk_folder or str(cache_dir()))
    return Bandwidths(cpu, disk, h2d, gpu, pinned, method)


def _matvec_rate(dtype: object, device: str) -> float:
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    cols = 4096
    rows = _PROBE_WEIGHT_BYTES // (cols * size)
    weight = torch.randn(rows, cols, device=device).to(dtype)
    x = torch.randn(1, cols, device=device).to(dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(x, weight)  # warm-up (kernel selection)
        if device == "cuda":
            torch.cuda.synchronize()
        repeats, started = 0, time.perf_counter()
        while time.perf_counter() - started < 0.3:
            torch.nn.functional.linear(x, weight)
            repeats += 1
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    return repeats * weight.numel() * weight.element_size() / elapsed


def _quantized_rates() -> dict[str, float]:
    """Bytes/s (weights and scales) that optdemo's int8 and int4 layers consume on the CPU for a
    batch-1 input: one probe-sized :class:`~optdemo.weights.quantize.QuantizedLinear` each, random levels
    (the kernels' speed does not depend on the values). Empty where the kernels are missing."""
    import torch

    from optdemo.system.hardware import quantization_unavailable
    from optdemo.weights.quantize import QuantizedLinear

    if quantization_unavailable(has_gpu=False):
        return {}
    cols = 4096
    rates = {}
    for scheme, kind in _KERNELS.items():
        rows = _PROBE_WEIGHT_BYTES // cols * (2 if scheme == "4bit" else 1)
        layer = QuantizedLinear(cols, rows, False, scheme, device="cpu")
        if scheme == "8bit":
            layer.weight.data = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
        else:
            levels = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
            layer.weight.data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
        layer.scales.data = torch.rand_like(layer.scales, dtype=torch.float32).to(layer.scales.dtype) / 100
        nbytes = sum(t.numel() * t.element_size() for t in (layer.weight, layer.scales))
        x = torch.randn(1, cols, dtype=torch.bfloat16)
        with torch.inference_mode():
            layer(x)  # warm-up
            repeats, started = 0, time.perf_counter()
            while time.perf_counter() - started < 0.3:
                layer(x)
                repeats += 1
            rates[kind] = repeats * nbytes / (time.perf_counter() - started)
    return rates


def _host_to_device_rate(pinned: bool) -> float:
    """Bytes/s of a 256 MiB host-to-device copy, from pageable memory (as Accelerate's hooks copy)
    or pinned memory (as the prefetcher copies)."""
    import torch

    host = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=pinned)
    device = torch.empty_like(host, device="cuda")
    device.copy_(host, non_blocking=pinned)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(4):
        device.copy_(host, non_blocking=pinned)
    torch.cuda.synchronize()
    return 4 * host.numel() / (time.perf_counter() - started)


def _disk_read_rate(folder: str) -> tuple[float, str]:
    """The disk's sequential read rate at ``folder`` and how it was read: large ``O_DIRECT`` reads
    of a file written for the purpose (past the page cache, as the streamer reads the disk tier),
    or buffered reads after dropping it from the cache where the file system has no ``O_DIRECT``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".optdemo-disk-probe-", delete=False) as handle:
        handle.write(os.urandom(_DISK_PROBE_BYTES))
        handle.flush()
        os.fsync(handle.fileno())
        name = handle.name
    try:
        try:
            return _timed_read(name, os.O_DIRECT), "direct"
        except (OSError, AttributeError):  # no O_DIRECT here (tmpfs, another OS)
            return _timed_read(name, 0), "buffered"
    finally:
        os.unlink(name)


def _timed_read(name: str, flags: int) -> float:
    """Bytes/s reading ``name`` from start to end in large reads (dropped from the cache first)."""
    fd = os.open(name, os.O_RDONLY | flags)
    buffer = mmap.mmap(-1, _DISK_PROBE_READ)  # page-aligned, as O_DIRECT wants
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        done, started = 0, time.perf_counter()
        while (got := os.preadv(fd, [buffer], done)) > 0:
            done += got
        return done / (time.perf_counter() - started)
    finally:
        buffer.close()
        os.close(fd)


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
    cpu_rate = bandwidths.plan_rate(plan)
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
    mapped (cached), the rest are read from disk every token while other blocks compute. Measured
    on this 2-core machine (docs/BENCHMARKS.md), about half of the shorter of reading and computing
    hides behind the longer. Fills ``breakdown``; returns the assumption."""
    mapped = sum(sizes[:kept])
    streamed = sum(sizes) - mapped
    breakdown["disk (computed)"] = sum(sizes) / bandwidths.plan_rate(plan)
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
    return replace(prediction, cpu_layers=policy)
