"""The arithmetic floor of a prompt's forward pass on this CPU, and what faster exact paths exist.

    python -m tools.prefill_floor --arch opt-13b --prompt 22 --json docs/disk/prefill-floor-opt-13b.json

A cold load + N tokens of a model larger than RAM is bounded below by the prompt's forward pass,
which no offloading scheme changes: it is arithmetic on weights that are already in RAM. This
builds one decoder layer of a catalog architecture (random float16 weights, in RAM), times its
forward over a prompt of ``--prompt`` tokens (x the number of layers: the floor), and times the
largest Linear layer (fc1) through each way torch can compute it on this CPU, checking which give
the float16 kernel's exact result: the float16 kernel, the same over cache-sized row blocks,
float32 through MKL, and bfloat16 through oneDNN (not float16 arithmetic).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optdemo.core.catalog import catalog_config_dict


def median_seconds(run: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall time of ``run`` over ``repeats`` calls, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fc1_paths(hidden: int, ffn: int, rows: int) -> dict[str, dict]:
    """fc1 (``rows`` x hidden -> ffn) through each path: seconds and whether it equals float16's."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    weight = (torch.randn(ffn, hidden) * 0.02).half()
    x = torch.randn(rows, hidden).half()
    reference = F.linear(x, weight)

    def blocks() -> Any:
        return torch.cat([F.linear(x, weight[i : i + 512]) for i in range(0, ffn, 512)], dim=1)

    def float32() -> Any:
        x32 = x.float()
        return torch.cat([x32 @ weight[i : i + 512].float().t() for i in range(0, ffn, 512)], dim=1).half()

    weight_bf16, x_bf16 = weight.bfloat16(), x.bfloat16()
    paths = {
        "float16": lambda: F.linear(x, weight),
        "float16 in 512-row blocks": blocks,
        "float32 (MKL), converted per block": float32,
        "bfloat16 (oneDNN), weights stored in bfloat16": lambda: F.linear(x_bf16, weight_bf16),
    }
    result = {}
    for name, run in paths.items():
        out = run()
        result[name] = {
            "seconds": median_seconds(run),
            "equals_float16": bool(torch.equal(out.half(), reference)),
            "max_abs_difference": float((out.float() - reference.float()).abs().max()),
        }
    flops = 2 * rows * hidden * ffn
    for entry in result.values():
        entry["gflops"] = flops / entry["seconds"] / 1e9
    return result


def layer_seconds(arch: str, rows: int) -> tuple[float, int]:
    """Seconds for one float16 decoder layer of ``arch`` over ``rows`` prompt tokens, and the
    number of layers."""
    import torch
    from transformers import OPTConfig
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    fields = {k: v for k, v in catalog_config_dict(arch).items() if not k.startswith("_")}
    config = OPTConfig(**fields)
    config._attn_implementation = "sdpa"  # what from_pretrained picks on the CPU
    layer = OPTDecoderLayer(config, layer_idx=0).half().eval()
    hidden = torch.randn(1, rows, config.hidden_size).half()
    mask = torch.full((rows, rows), float("-inf")).triu(1).half()[None, None]
    with torch.inference_mode():
        seconds = median_seconds(lambda: layer(hidden, attention_mask=mask))
    return seconds, config.num_hidden_layers


def main(argv: list[str] | None = None) -> int:
    """Measure and print; write the JSON asked for."""
    parser = argparse.ArgumentParser(prog="python -m tools.prefill_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="opt-13b")
    parser.add_argument("--prompt", type=int, default=22, help="prompt tokens (the benchmark's prompt: 22)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch

    fields = catalog_config_dict(args.arch)
    per_layer, layers = layer_seconds(args.arch, args.prompt)
    paths = fc1_paths(fields["hidden_size"], fields["ffn_dim"], args.prompt)
    result = {
        "command": "python -m tools.prefill_floor " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "arch": args.arch,
        "prompt_tokens": args.prompt,
        "layer_seconds": per_layer,
        "layers": layers,
        "prefill_floor_seconds": per_layer * layers,
        "fc1": paths,
    }
    print(f"{args.arch}: a float16 layer, {args.prompt} tokens: {per_layer * 1e3:.0f} ms, x {layers} layers")
    print(f"  = {per_layer * layers:.1f} s of arithmetic for the prompt, whatever the offloading")
    for name, entry in paths.items():
        difference = entry["max_abs_difference"]
        same = "same result" if entry["equals_float16"] else f"differs (max {difference:.2g})"
        print(f"  fc1 {name}: {entry['seconds'] * 1e3:.1f} ms, {entry['gflops']:.0f} GFLOP/s, {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
