"""Memory budgets: parse what people type for ``max_memory`` and format byte counts.

Accepted forms (case-insensitive, whitespace-tolerant):

* ``0=5GiB,cpu=20GiB`` and ``cuda:0=5GiB, cpu=20 GB`` (``;`` also separates entries)
* the dict the original scripts passed to ``from_pretrained``: ``{0: "5GiB", "cpu": "20GiB"}``
  (a bare integer value there means bytes, as in Accelerate)
* units B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024), decimals allowed

Devices are GPU indices (``0``, ``cuda:0``, ``gpu:0``), ``cpu`` and ``disk``. Anything else raises
:class:`~optdemo.core.errors.BudgetError` with a message naming the problem, never another exception.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from decimal import Decimal

from optdemo.core.errors import BudgetError

Device = int | str  # GPU index, "cpu" or "disk": the keys Accelerate's max_memory uses

# Decimal units follow Accelerate's convert_file_size_to_int (GB = 10**9), binary ones are exact.
UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# No single machine we serve has a petabyte of memory on one device; larger is a typo.
MAX_DEVICE_BYTES = 2**50
# Hostile or pasted-by-mistake input should not cost us a regex over megabytes of text.
MAX_SPEC_CHARS = 2000

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_GPU_RE = re.compile(r"^(?:(?:cuda|gpu)\s*:\s*)?(\d{1,6})$", re.IGNORECASE)
MAX_GPU_INDEX = 1024
_DEVICE_ORDER = {"cpu": 1, "disk": 2}


def format_bytes(n: float) -> str:
    """Format a byte count the way people read memory sizes: ``1.5 GiB``, ``512 MiB``, ``0 B``."""
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        # Compare after rounding to 3 significant digits, so 1023.9 KiB reads "1 MiB", not "1024 KiB".
        if abs(float(f"{n / size:.3g}")) >= 1 or (unit == "TiB" and abs(n) >= size):
            value = n / size
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def parse_size(text: str | int | float, *, device: str = "") -> int:
    """Parse one size (``"5GiB"``, ``"20 GB"``, ``"0.5gib"``, or an integer byte count) into bytes.

    Args:
        text: the size as typed; a string needs a unit, an ``int`` is a byte count.
        device: only used to name the device in error messages.
    """
    where = f" for {device}" if device else ""
    if isinstance(text, bool):
        raise BudgetError(f"size{where} must be a number with a unit such as 5GiB, not {text!r}")
    if isinstance(text, int):
        if text > MAX_DEVICE_BYTES:  # before float(): a huge int would overflow it
            raise BudgetError(f"size{where} {text} bytes is absurdly large (over 1 PiB)")
        value = float(text)
    elif isinstance(text, float):
        raise BudgetError(f"size{where} {text!r} needs a unit: write it as e.g. '{text:g}GiB'")
    elif isinstance(text, str):
        match = _SIZE_RE.match(text)
        if not match:
            raise BudgetError(
                f"size{where} {text.strip()[:40]!r} is not a size: write a positive number with a "
                "unit, such as 5GiB or 512MB"
            )
        number, unit = match.groups()
        if not unit:
            raise BudgetError(
                f"size{where} {text.strip()!r} has no unit: write e.g. {number}GiB or {number}GB"
            )
        if unit.lower() not in UNITS:
            raise BudgetError(f"unknown unit {unit!r}{where}: use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB")
        # Decimal keeps "4.1GB" exactly 4_100_000_000 bytes (a float would make it 4_099_999_999).
        value = Decimal(number) * UNITS[unit.lower()]
    else:
        raise BudgetError(f"size{where} must be text such as '5GiB', not {type(text).__name__}")
    if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise BudgetError(f"size{where} must be a positive number of bytes, got {text!r}")
    if value > MAX_DEVICE_BYTES:
        raise BudgetError(f"size{where} {format_bytes(value)} is absurdly large (over 1 PiB): check the unit")
    return int(value)  # whole bytes; a Decimal truncates exactly


def parse_device(key: str | int) -> Device:
    """Normalise a device name: ``0``/``"0"``/``"cuda:0"``/``"gpu:0"`` -> ``0``; ``cpu``; ``disk``."""
    if isinstance(key, bool):
        raise BudgetError(f"unknown device {key!r}: use a GPU index (0, cuda:0), cpu or disk")
    if isinstance(key, int):
        if key < 0:
            raise BudgetError(f"GPU index {key} is negative: GPUs are numbered 0, 1, ...")
        if key > MAX_GPU_INDEX:
            raise BudgetError(f"GPU index {key} is not a GPU any machine has")
        return key
    if not isinstance(key, str):
        raise BudgetError(f"unknown device {key!r}: use a GPU index (0, cuda:0), cpu or disk")
    name = key.strip().lower()
    if name in ("cpu", "disk"):
        return name
    if name == "cuda":  # "cuda" alone means the current (first) GPU, as in torch
        return 0
    match = _GPU_RE.match(name)
    if match:
        index = int(match.group(1))
        if index > MAX_GPU_INDEX:
            raise BudgetError(f"GPU index {index} is not a GPU any machine has")
        return index
    shown = key.strip()[:40]
    raise BudgetError(f"unknown device {shown!r}: use a GPU index (0, cuda:0), cpu or disk")


@dataclass(frozen=True)
class MemoryBudget:
    """How many bytes each device may hold, in Accelerate's order: GPUs by index, cpu, disk.

    Immutable and hashable so that it can sit in a frozen :class:`~optdemo.core.load_config.LoadConfig`;
    two budgets are equal exactly when they allow the same bytes on the same devices.
    """

    limits: tuple[tuple[Device, int], ...]

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.limits, key=lambda item: _sort_key(item[0])))
        object.__setattr__(self, "limits", ordered)

    def as_max_memory(self) -> dict[Device, int]:
        """The dict ``from_pretrained(max_memory=...)`` expects, sizes in bytes."""
        return dict(self.limits)

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """The GPU indices this budget names, ascending."""
        return tuple(device for device, _ in self.limits if isinstance(device, int))

    def get(self, device: Device, default: int = 0) -> int:
        """The budget for one device in bytes, or ``default`` when it is not named."""
        return dict(self.limits).get(device, default)

    @property
    def in_memory_bytes(self) -> int:
        """Total of the GPU and CPU budgets: what can be held without touching disk."""
        return sum(size for device, size in self.limits if device != "disk")

    def __str__(self) -> str:
        return ",".join(f"{device}={_format_spec_size(size)}" for device, size in self.limits)


def _sort_key(device: Device) -> tuple[int, int]:
    if isinstance(device, int):
        return (0, device)
    return (_DEVICE_ORDER.get(device, 3), 0)


def _format_spec_size(size: int) -> str:
    """A size that parses back to exactly the same byte count (for the canonical spec)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % UNITS[unit.lower()] == 0:
            return f"{size // UNITS[unit.lower()]}{unit}"
    return f"{size}B"


def parse_max_memory(spec: str | dict | MemoryBudget) -> MemoryBudget:
    """Parse a max_memory specification into a :class:`MemoryBudget`.

    Args:
        spec: ``"0=5GiB,cpu=20GiB"``, the dict form (as text or as a dict), or a budget (returned).

    Raises:
        BudgetError: empty input, unknown device, duplicate device, bad or absurd size.
    """
    if isinstance(spec, MemoryBudget):
        return spec
    if isinstance(spec, dict):
        entries = list(spec.items())
    elif isinstance(spec, str):
        entries = _split_entries(spec)
    else:
        raise BudgetError(f"max_memory must be text such as '0=5GiB,cpu=20GiB', not {type(spec).__name__}")
    if not entries:
        raise BudgetError("max_memory is empty: give at least one device, e.g. cpu=8GiB")
    limits: dict[Device, int] = {}
    for key, value in entries:
        device = parse_device(key)
        if device in limits:
            raise BudgetError(f"device {device} appears twice in max_memory: give each device once")
        limits[device] = parse_size(value, device=str(device))
    return MemoryBudget(tuple(limits.items()))


def _split_entries(text: str) -> list[tuple[str | int, str | int]]:
    """Split ``0=5GiB,cpu=20GiB`` or ``{0: "5GiB"}`` text into (device, size) pairs."""
    if len(text) > MAX_SPEC_CHARS:
        raise BudgetError(f"max_memory is {len(text)} characters long: this cannot be a budget")
    text = text.strip()
    if not text:
        raise BudgetError("max_memory is empty: give at least one device, e.g. cpu=8GiB")
    if text.startswith("{"):
        return list(_literal_dict(text).items())
    entries: list[tuple[str | int, str | int]] = []
    for part in re.split(r"[,;]", text):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise BudgetError(f"entry {part.strip()[:40]!r} has no '=': write device=size, e.g. cpu=20GiB")
        entries.append((key, value))
    return entries


def _literal_dict(text: str) -> dict:
    """Read the Python/JSON dict form safely (literals only, never code)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise BudgetError(
            "max_memory looks like a dict but is not valid: write it as {0: '5GiB', 'cpu': '20GiB'}"
        ) from None
    if not isinstance(value, dict):
        raise BudgetError("max_memory must be a dict of device to size, e.g. {'cpu': '20GiB'}")
    keys = [ast.literal_eval(key) for key in ast.parse(text, mode="eval").body.keys if key is not None]
    if len({repr(key) for key in keys}) != len(keys):
        raise BudgetError("a device appears twice in max_memory: give each device once")
    return value


def missing_gpus(budget: MemoryBudget, gpu_count: int) -> tuple[int, ...]:
    """The GPU indices the budget names that this machine (with ``gpu_count`` GPUs) lacks."""
    return tuple(index for index in budget.gpu_indices if index >= gpu_count)


def describe_gpu_count(gpu_count: int) -> str:
    """``this machine has 1 GPU (0)`` / ``... no GPU``: for messages about missing GPUs."""
    if gpu_count == 0:
        return "this machine has no GPU"
    if gpu_count == 1:
        return "this machine has 1 GPU (0)"
    return f"this machine has {gpu_count} GPUs (0-{gpu_count - 1})"
