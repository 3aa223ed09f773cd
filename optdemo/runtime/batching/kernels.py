"""Matrix products whose rows never depend on their company, and prompts at the fastest exact kernel.

torch's CPU matrix products compute a row differently depending on how many rows are computed
with it: a float32 product of 1, 2 or 3 rows (or the remainder rows of 5-7, 9-11) runs another
micro-kernel than 4 or 12 rows do, a bfloat16 product of one row another than of two. So the same
token could get different bits when its prompt is computed whole, after a reused prefix, beside
other visitors' replies, or in a speculative verification pass. While the engine computes (inside
:func:`computing`), every ``torch.nn.functional.linear`` call of its thread goes through
:func:`_linear`: rows are padded with zero rows to a count the kernel computes canonically, the
same bits as in any larger product (measured once per kernel by :func:`probe_rows`); rows are
independent, so the padding changes nothing else.

Prompts may use a faster kernel than decoding steps when it is at least as exact: float16 weights
computed in float32, block by block of output features (each block cast while it is in the
cache), where the CPU's float16 product is slow (no FP16 units: it runs a row at a time). Its
results are float32 products rounded once to float16, never less accurate than the float16 path.
The prompt's key/value rows are then what every later prompt computes for the same tokens, which
is what makes a reused prefix exact (:mod:`optdemo.runtime.batching.prefix_cache`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optdemo.plan.bandwidth import float16_in_float32
from optdemo.plan.policy import FLOAT32_KERNEL, NATIVE_KERNEL

if TYPE_CHECKING:
    import torch

PROMPT = "prompt"  # a prompt (several tokens of one sequence): the prompt kernel may apply
STEP = "step"  # decoding steps and verification passes: the load dtype's own kernel
NATIVE = NATIVE_KERNEL  # the load dtype's own kernel
FLOAT32 = FLOAT32_KERNEL  # float16 weights computed in float32, block by block (prompts only)
PROBE_ROWS = 48  # row counts probed one by one; larger counts are checked at a few sizes
_LARGE_ROWS = (64, 96)
_PROBE_FEATURES = 512

_local = threading.local()
_rules: dict[tuple[str, str, str], RowRule] = {}
_rules_lock = threading.Lock()
_original_linear: Callable[..., Any] | None = None


@dataclass(frozen=True)
class RowRule:
    """Which row counts a kernel computes canonically: ``safe`` among 1..``PROBE_ROWS``, and every
    larger count when ``large`` (else the kernel is never trusted to be canonical)."""

    safe: frozenset[int]
    large: bool = True

    @property
    def exact(self) -> bool:
        """Whether padding can make every product canonical with this kernel."""
        return self.large and bool(self.safe)

    def padded(self, rows: int) -> int:
        """The fewest rows, at least ``rows``, that this kernel computes canonically."""
        if rows > PROBE_ROWS or not self.exact:
            return rows
        return next((count for count in sorted(self.safe) if count >= rows), PROBE_ROWS + 1)


@dataclass(frozen=True)
class KernelChoice:
    """The products a loaded model computes with: its prompt kernel, and whether every product is
    canonical (the condition for exact prefix reuse and verification)."""

    prompt_kernel: str  # NATIVE or FLOAT32
    exact: bool
    reason: str  # for people: which kernel and why

    def to_dict(self) -> dict:
        """Plain data for /status and the benchmark JSON."""
        return {"prompt_kernel": self.prompt_kernel, "exact": self.exact, "reason": self.reason}


def _native(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    import torch

    return (_original_linear or torch.nn.functional.linear)(x, weight, bias)


def _float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return float16_in_float32(x, weight, bias, _original_linear)


_KERNEL_FUNCTIONS = {NATIVE: _native, FLOAT32: _float32}


def probe_rows(kernel: str, dtype: torch.dtype, device: str = "cpu") -> RowRule:
    """Measure which row counts ``kernel`` computes canonically for weights of ``dtype``: each
    count's rows, at a few offsets, against the same rows of a 128-row product (every tile full).
    Cached per (kernel, dtype, device type) for the process: a few milliseconds once."""
    import torch

    key = (kernel, str(dtype), str(torch.device(device).type))
    with _rules_lock:
        if key in _rules:
            return _rules[key]
    product = _KERNEL_FUNCTIONS[kernel]
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(_PROBE_FEATURES, _PROBE_FEATURES, generator=generator) / 32).to(dtype).to(device)
    bias = torch.randn(_PROBE_FEATURES, generator=generator).to(dtype).to(device)
    x = torch.randn(128, _PROBE_FEATURES, generator=generator).to(dtype).to(device)

    def canonical(rows: int) -> bool:
        return all(
            torch.equal(product(x[start : start + rows], weight, bias), reference[start : start + rows])
            for start in (0, 37)
            if start + rows <= x.shape[0]
        )

    with torch.inference_mode():
        reference = product(x, weight, bias)
        safe = frozenset(rows for rows in range(1, PROBE_ROWS + 1) if canonical(rows))
        large = all(canonical(rows) for rows in _LARGE_ROWS)
    rule = RowRule(safe, large)
    with _rules_lock:
        _rules[key] = rule
    return rule


def choose_kernels(model: Any, prompt_kernel: str = NATIVE) -> KernelChoice:
    """The kernels for ``model``'s products: ``prompt_kernel`` (from the plan's measured rates)
    where its weights are float16 on the CPU, and whether every kernel it uses can be made
    canonical by padding (probed now for each weight dtype and device it has)."""
    import torch

    dtypes = {
        (module.weight.dtype, module.weight.device.type)
        for module in model.modules()
        if type(module) is torch.nn.Linear and module.weight.device.type != "meta"
    }
    uses_float16_on_cpu = any(dtype == torch.float16 and kind == "cpu" for dtype, kind in dtypes)
    kernel = prompt_kernel if uses_float16_on_cpu else NATIVE
    rules = [probe_rows(NATIVE, dtype, kind) for dtype, kind in dtypes]
    if kernel == FLOAT32:
        rules.append(probe_rows(FLOAT32, torch.float16, "cpu"))
    exact = all(rule.exact for rule in rules)
    if kernel == FLOAT32:
        reason = "prompts: float16 weights computed in float32 (faster than float16 on this CPU, as exact)"
    else:
        reason = "prompts: the load dtype's own kernel"
    if not exact:
        reason += "; a kernel here gives rows that depend on their company: reuse is off"
    return KernelChoice(kernel, exact, reason)


@contextlib.contextmanager
def computing(mode: str, choice: KernelChoice | None) -> Iterator[None]:
    """Inside, this thread's linear products are canonical (padded rows) and a ``PROMPT`` uses the
    chosen prompt kernel; other threads are untouched. Nothing changes without a choice."""
    _install()
    previous = getattr(_local, "state", None)
    _local.state = None if choice is None else (mode, choice)
    try:
        yield
    finally:
        _local.state = previous


def current_mode() -> str | None:
    """``PROMPT`` or ``STEP`` inside :func:`computing` (this thread), else None."""
    state = getattr(_local, "state", None)
    return None if state is None else state[0]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` while installed: as torch's for other threads, canonical
    inside :func:`computing`."""
    state = getattr(_local, "state", None)
    assert _original_linear is not None
    if state is None or weight.device.type == "meta" or x.shape[-1] == 0:
        return _original_linear(x, weight, bias)
    mode, choice = state
    import torch

    use_float32 = (
        mode == PROMPT and choice.prompt_kernel == FLOAT32 and weight.dtype == torch.float16
    ) and weight.device.type == "cpu"
    kernel = FLOAT32 if use_float32 else NATIVE
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    padded = probe_rows(kernel, weight.dtype, weight.device.type).padded(rows)
    if padded > rows:
        flat = torch.cat([flat, flat.new_zeros((padded - rows, flat.shape[1]))])
    out = _KERNEL_FUNCTIONS[kernel](flat, weight, bias)
    return out[:rows].reshape(*x.shape[:-1], weight.shape[0])


def _install() -> None:
    """Route ``torch.nn.functional.linear`` (what ``nn.Linear`` calls) through :func:`_linear`,
    once per process; it behaves as torch's own outside :func:`computing`."""
    global _original_linear
    import torch

    with _rules_lock:
        if _original_linear is None:
            _original_linear = torch.nn.functional.linear
            torch.nn.functional.linear = _linear
