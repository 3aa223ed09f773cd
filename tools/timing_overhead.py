"""What the timing hooks cost: forward passes with and without them, and the hooks alone.

    python -m tools.timing_overhead --arch tiny-opt --arch opt-350m --json timing-overhead.json

For each model (the built-in tiny-opt, or a random-weight catalog architecture built once under
``$OPTDEMO_CACHE/bench``), loaded all in RAM by the model manager (which installs the hooks of
:mod:`optdemo.runtime.timing_hooks`): decode steps (one token, with a KV cache) and a prompt pass,
timed with the hooks and without them, alternating, ``--repeats`` times each; the medians, and
their difference per pass. On a shared machine that difference is within the noise, so the hooks'
own cost is measured too: a block's two hooks called ``--calls`` times in a pass that measures
nothing else, times the blocks a pass runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from optdemo.core.catalog import TINY_MODEL_ID
from optdemo.core.load_config import LoadConfig
from optdemo.plan.bandwidth import measured_bandwidths
from optdemo.runtime import timing, timing_hooks
from optdemo.runtime.manager import ModelManager
from tools.bench import ensure_checkpoint


def timed(run: Any, repeats: int) -> list[float]:
    """Wall times of ``run()``, one per repeat (after one untimed call)."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def passes(model: Any, prompt: int, steps: int) -> tuple[Any, Any]:
    """Two workloads on ``model``: ``steps`` decode steps after a cached prompt, and one prompt
    pass of ``prompt`` tokens."""
    import torch
    from transformers import DynamicCache

    ids = torch.arange(2, 2 + prompt).unsqueeze(0)

    def decode() -> None:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            out = model(input_ids=ids[:, :8], past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                token = (
                    model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                )

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    return decode, prefill


def hook_cost(loaded: Any, calls: int, sampling: bool) -> float:
    """Seconds a block's hooks add to its call, torch's dispatch included: a block's two hooks on
    a module that does nothing, called ``calls`` times in a measured pass, less the same module
    without them. ``sampling``: in a pass that measures the blocks' reads from storage (two
    reads of /proc a block)."""
    import torch

    timer = loaded.model._optdemo_timer
    index = next((i for i, reads in enumerate(timer.reads) if reads), 0)
    module, x = torch.nn.Identity(), torch.zeros(1)

    def run() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            module(x)
        return (time.perf_counter() - started) / calls

    plain = min(run() for _ in range(3))
    handles = [
        module.register_forward_pre_hook(timer._block_begins(index)),
        module.register_forward_hook(timer._block_ends(index), always_call=True),
    ]
    record = timing.begin(timer, timing.STEP, 1)
    assert record is not None
    record.sampling = sampling
    try:
        hooked = min(run() for _ in range(3))
    finally:
        timing.end(timer)
        for handle in handles:
            handle.remove()
    return hooked - plain


def measure(arch: str, dtype: str, repeats: int, steps: int, prompt: int, calls: int) -> dict:
    """One model's figures (seconds)."""
    where = TINY_MODEL_ID if arch == "tiny-opt" else str(ensure_checkpoint(arch, "safetensors", dtype))
    manager = ModelManager()
    manager.load(LoadConfig(where, dtype=dtype))
    loaded = manager._loaded
    model, plan = loaded.model, loaded.status.plan
    decode, prefill = passes(model, prompt, steps)
    results: dict[str, Any] = {"model": arch, "dtype": dtype, "blocks": len(plan.blocks)}
    for name, run, count in (("decode_step", decode, steps + 1), ("prompt_pass", prefill, 1)):
        on, off = [], []
        for _ in range(repeats):  # alternating, so that a busy spell hits both alike
            on += timed(run, 1)
            timing_hooks.uninstall(model)
            off += timed(run, 1)
            timing_hooks.install(model, plan, loaded.status.device_map, measured_bandwidths())
        with_hooks, without = statistics.median(on) / count, statistics.median(off) / count
        results[name] = {
            "with_hooks_s": with_hooks,
            "without_s": without,
            "difference": (with_hooks - without) / without,
            "difference_of_fastest": (min(on) - min(off)) / min(off),
        }
    results["hooks_per_block_s"] = hook_cost(loaded, calls, sampling=False)
    results["hooks_per_block_reading_s"] = hook_cost(loaded, calls, sampling=True)
    results["hooks_per_pass_s"] = results["hooks_per_block_s"] * len(plan.blocks)
    for name in ("decode_step", "prompt_pass"):
        results[name]["hooks_share"] = results["hooks_per_pass_s"] / results[name]["without_s"]
    manager.unload()
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line: measure each ``--arch``, print one line each, write ``--json``."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.timing_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--arch", action="append", help="tiny-opt or a catalog name (repeatable)")
    parser.add_argument("--dtype", default="float16", help="for the catalog architectures")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--threads", type=int, help="torch's threads (fewer: steadier on a shared machine)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    figures = []
    for arch in args.arch or ["tiny-opt"]:
        dtype = "float32" if arch == "tiny-opt" else args.dtype
        result = measure(arch, dtype, args.repeats, args.steps, args.prompt, args.calls)
        figures.append(result)
        step, prompt = result["decode_step"], result["prompt_pass"]
        hooks, reading = result["hooks_per_block_s"] * 1e6, result["hooks_per_block_reading_s"] * 1e6
        print(
            f"{arch} ({dtype}, {result['blocks']} blocks): decode step {step['without_s'] * 1e3:.2f} ms, "
            f"with hooks {step['difference']:+.1%} (fastest {step['difference_of_fastest']:+.1%}); prompt "
            f"pass {prompt['without_s'] * 1e3:.1f} ms, with hooks {prompt['difference']:+.1%} (fastest "
            f"{prompt['difference_of_fastest']:+.1%}); a block's hooks {hooks:.1f} us ({reading:.1f} us "
            f"measuring reads) = {step['hooks_share']:.2%} of a decode step, {prompt['hooks_share']:.3%} "
            "of the prompt pass"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
