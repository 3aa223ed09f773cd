"""This machine's bandwidths: what each tier moves or consumes per second, measured once.

Decoding one token reads every weight once, so the time per token is close to
``sum(bytes on tier / bandwidth of tier)`` (:mod:`optdemo.plan.speed`). The bandwidths are measured
once on this machine (a few seconds) and cached in ``$OPTDEMO_CACHE/bandwidths.json``:

* CPU matrix-vector speed per dtype (weight bytes per second that ``x @ W.T`` consumes), and of
  optdemo's int8 / int4 layers,
* disk read speed at the offload/cache folder, past the page cache,
* host-to-device copy speed and GPU matrix-vector speed when a GPU is present.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from optdemo.core.paths import cache_dir

if TYPE_CHECKING:
    import torch

_PROBE_WEIGHT_BYTES = 64 * 2**20  # the probe weight: big enough to leave the CPU caches, as layers do
_DISK_PROBE_BYTES = 128 * 2**20
_DISK_PROBE_READ = 16 * 2**20  # per read: large, sequential, like the streamer's block reads
_lock = threading.Lock()
KERNELS = {"8bit": "int8", "4bit": "int4"}  # quantization scheme -> its cpu_matvec entry


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
    # flatters), measured again.
    disk_probe: str = ""
    # FLOP/s of a prompt-sized product (PROMPT_ROWS rows) per way of computing it on the CPU:
    # "float32", "bfloat16", "float16", and "float16-in-float32" (float16 weights computed in
    # float32 block by block); empty in caches written before optdemo measured it, measured again.
    prompt_matmul: dict[str, float] = field(default_factory=dict)

    def cpu_rate(self, dtype: str) -> float:
        """CPU weight-consumption rate for ``dtype`` (float32's when unmeasured)."""
        return self.cpu_matvec.get(dtype) or self.cpu_matvec["float32"]

    @property
    def pinned_rate(self) -> float | None:
        """Host-to-device bytes/s from pinned memory (the pageable rate when not measured)."""
        return self.host_to_device_pinned or self.host_to_device


def bandwidths_path() -> Path:
    """Where measured bandwidths are cached."""
    return cache_dir() / "bandwidths.json"


def measured_bandwidths(refresh: bool = False, disk_folder: str | None = None) -> Bandwidths:
    """This machine's bandwidths, measured once (a few seconds) and then read from the cache; a
    cache written by an older optdemo gains what it lacks, nothing else is measured again."""
    path = bandwidths_path()
    with _lock:
        result = None
        if path.exists() and not refresh:
            try:
                result = Bandwidths(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                result = None  # an old or damaged file: measure again
        if result is None:
            result = measure_bandwidths(disk_folder)
        else:
            completed = _completed(result, disk_folder)
            if completed == result:
                return result
            result = completed
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(result), indent=2))
        return result


def _completed(result: Bandwidths, disk_folder: str | None) -> Bandwidths:
    """``result`` with what older caches lack measured now: the quantized kernels' rates, the
    disk read past the page cache, the prompt products' rates."""
    if not all(kind in result.cpu_matvec for kind in KERNELS.values()):
        result = replace(result, cpu_matvec={**result.cpu_matvec, **_quantized_rates()})
    if not result.disk_probe:
        rate, method = _disk_read_rate(disk_folder or str(cache_dir()))
        result = replace(result, disk_read=rate, disk_probe=method)
    if not result.prompt_matmul:
        result = replace(result, prompt_matmul=prompt_rates())
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
    return Bandwidths(cpu, disk, h2d, gpu, pinned, method, prompt_rates())


PROMPT_ROWS = 128  # a short prompt's tokens: the rows of a prompt-sized product
FLOAT16_IN_FLOAT32 = "float16-in-float32"


def prompt_rates() -> dict[str, float]:
    """FLOP/s of a prompt-sized product (``PROMPT_ROWS`` x 2048 by 2048 x 2048) on the CPU, per
    way of computing it: each dtype's own kernel, and float16 weights cast to float32 block by
    block (:func:`float16_in_float32`), the one alternative as exact as float16's own."""
    import torch

    rates = {}
    for name in ("float32", "bfloat16", "float16", FLOAT16_IN_FLOAT32):
        dtype = torch.float16 if name == FLOAT16_IN_FLOAT32 else getattr(torch, name)
        weight = (torch.randn(2048, 2048) / 45).to(dtype)
        x = torch.randn(PROMPT_ROWS, 2048).to(dtype)

        def product(weight: torch.Tensor = weight, x: torch.Tensor = x, name: str = name) -> object:
            if name == FLOAT16_IN_FLOAT32:
                return float16_in_float32(x, weight, None)
            return torch.nn.functional.linear(x, weight)

        with torch.inference_mode():
            product()  # warm-up (kernel selection)
            repeats, started = 0, time.perf_counter()
            while time.perf_counter() - started < 0.2 or repeats < 2:
                product()
                repeats += 1
            rates[name] = repeats * 2 * PROMPT_ROWS * weight.numel() / (time.perf_counter() - started)
    return rates


_BLOCK_BYTES = 2**21  # float32 weight bytes cast per block: stays in a core's cache


def float16_in_float32(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, linear: Callable | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` for float16 weights computed in float32, a block of output features
    at a time (each block of weights cast while it is in the cache), rounded once to ``x``'s
    dtype: never less accurate than float16's own product, and faster where the CPU has no
    float16 units. ``linear`` is the product to call (torch's by default)."""
    import torch

    linear = linear or torch.nn.functional.linear
    x32 = x.float()
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    step = max(64, _BLOCK_BYTES // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        block = weight[start : start + step].float()
        part_bias = None if bias is None else bias[start : start + step].float()
        out[:, start : start + step] = linear(x32, block, part_bias)
    return out


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
    for scheme, kind in KERNELS.items():
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
