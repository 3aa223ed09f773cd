"""Benchmark: a chat at the machine's speed (issue #21), with numbers from one invocation.

    python -m tools.chat_bench chat --build opt-1.3b --json docs/chat/six-turn-opt-1.3b.json
    python -m tools.chat_bench prompt --build opt-1.3b --baseline-ref e4ba474 --json docs/chat/prompt-200.json
    python -m tools.chat_bench memory --build opt-1.3b --max-memory cpu=4GiB --json docs/chat/memory-8.json

* ``chat``: the app (``app.py``, a fresh process each) with prompt caches on, then off; a six-turn
  conversation through ``/v1/chat/completions`` (greedy, each turn resends the whole conversation
  and adds ~``--turn-tokens`` tokens), then the same conversation sent again. Records each
  request's seconds and usage (``prompt_tokens_details.cached_tokens``) and every reply's text, so
  the replies with and without reuse are compared.
* ``prompt``: a ``--prompt-tokens`` prompt's first token on this checkout and on ``--baseline-ref``
  (checked out into a temporary git worktree), alternating, each in a fresh process, in RAM and
  with a disk tier (``--disk-memory``): the prompt's own seconds and the ratio.
* ``memory``: the app under a memory cgroup (``tools/memcap.py``) while ``--chats`` conversations
  run at once, each kept in a prompt cache: the cgroup's peak against the plan's budget, the
  cache's bytes against its budget (``/status``), and whether the cap was ever hit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tools.bench import ensure_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "river",
    "mountain",
    "lantern",
    "harbor",
    "meadow",
    "quiet",
    "silver",
    "engine",
    "garden",
    "window",
    "copper",
    "story",
    "orbit",
    "forest",
    "candle",
    "signal",
    "marble",
    "bridge",
    "winter",
    "ocean",
    "paper",
    "thunder",
    "valley",
    "mirror",
    "planet",
    "field",
]


# ---------------------------------------------------------------------------------- shared
def words(count: int, seed: int) -> str:
    """Deterministic prose of ``count`` words (a turn's message)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class App:
    """``app.py`` in a process of its own on loopback, with the model preloaded."""

    def __init__(self, flags: list[str], preexec: Any = None, timeout: float = 900.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        handle, log = tempfile.mkstemp(prefix="optdemo-chat-bench-", suffix=".log")
        self.log = Path(log)
        command = [sys.executable, "app.py", "--preload", "--port", str(self.port), *flags]
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, preexec_fn=preexec
        )
        os.close(handle)  # the child has its own copy
        self.command = command
        deadline = time.monotonic() + timeout
        import httpx

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "v1/models", timeout=2).json().get("data"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        self.close()
        raise RuntimeError("the app did not come up in time")

    def status(self) -> dict:
        """``/status`` of the named API (plain REST: it never queues)."""
        import httpx

        answer = httpx.post(self.url + "gradio_api/run/status", json={"data": []}, timeout=30)
        return answer.json()["data"][0]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def chat_request(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One greedy ``/v1/chat/completions``: seconds, usage, reply text."""
    import httpx

    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    answer = httpx.post(url + "v1/chat/completions", json=body, timeout=3600)
    seconds = time.perf_counter() - started
    data = answer.json()
    if answer.status_code != 200:
        raise RuntimeError(f"HTTP {answer.status_code}: {data}")
    usage = data["usage"]
    return {
        "seconds": seconds,
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
        "completion_tokens": usage["completion_tokens"],
        "reply": data["choices"][0]["message"]["content"],
    }


def conversation(url: str, turns: int, turn_words: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """A conversation of ``turns`` requests, each resending all before it, then the last one again."""
    messages: list[dict] = []
    results = []
    for turn in range(turns):
        messages.append({"role": "user", "content": words(turn_words, seed * 1000 + turn)})
        result = chat_request(url, messages, max_tokens)
        results.append({"turn": turn + 1, **result})
        messages.append({"role": "assistant", "content": result["reply"]})
    again = chat_request(url, messages[:-1], max_tokens)  # the last request, sent once more
    results.append({"turn": "again", **again})
    return results


# ---------------------------------------------------------------------------------- chat
def run_chat(args: argparse.Namespace, model: Path) -> dict:
    """The six-turn conversation with prompt caches on, then off (each in a fresh app)."""
    sides = {}
    for side, extra in (("reuse", []), ("no-reuse", ["--no-prefix-cache"])):
        app = App(["--model", str(model), "--dtype", args.dtype, "--max-memory", args.max_memory, *extra])
        try:
            chat_request(app.url, [{"role": "user", "content": "warm up"}], 1)  # first-use costs
            turns = conversation(app.url, args.turns, args.turn_words, args.max_tokens)
            sides[side] = {"command": app.command, "turns": turns, "status": app.status()}
        finally:
            app.close()
    reuse, plain = sides["reuse"]["turns"], sides["no-reuse"]["turns"]
    first, last, again = reuse[0]["seconds"], reuse[args.turns - 1]["seconds"], reuse[-1]["seconds"]
    summary = {
        "turn_last_vs_first": last / first,
        "again_vs_its_first_time": again / plain[-1]["seconds"],
        "again_vs_last_turn_reused": again / last,
        "replies_identical": [t["reply"] for t in reuse] == [t["reply"] for t in plain],
        "no_reuse_turn_last_vs_first": plain[args.turns - 1]["seconds"] / plain[0]["seconds"],
    }
    return {"sides": sides, "summary": summary}


# ---------------------------------------------------------------------------------- prompt
WORKER = """
import json, sys, time
sys.path.insert(0, {src!r})
try:
    from optdemo.runtime.manager import ModelManager
    from optdemo.core.load_config import LoadConfig
    from optdemo.core.generation import GenerationParams
except ImportError:  # the flat layout before the subpackages
    from optdemo.manager import ModelManager
    from optdemo.config import LoadConfig
    from optdemo.generation import GenerationParams
budget, offload = {budget!r} or None, {offload!r} or None
config = LoadConfig({model!r}, dtype={dtype!r}, max_memory=budget, offload_folder=offload)
manager = ModelManager()
manager.load(config)
prompt = open({prompt_file!r}).read()
params = GenerationParams(max_new_tokens=1, temperature=0)
list(manager.stream_completion("Hello there, a first short prompt", params))  # first-use costs
*_, last = manager.stream_completion(prompt, params)
stats = last.stats
print(json.dumps({{"time_to_first_token": stats.time_to_first_token, "prompt_tokens": stats.prompt_tokens,
  "prompt_seconds": getattr(stats, "prompt_seconds", None), "token_ids": list(last.token_ids)}}))
"""


def prompt_text(model: Path, tokens: int) -> str:
    """Text whose tokenization is exactly ``tokens`` tokens long with the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids = tokenizer(words(tokens * 2, 7), add_special_tokens=True).input_ids
    text = tokenizer.decode(ids[1 : tokens + 8], skip_special_tokens=True)
    while len(tokenizer(text).input_ids) > tokens:
        text = text.rsplit(" ", 1)[0]
    return text


def prompt_run(src: Path, model: Path, dtype: str, budget: str, offload: str, prompt_file: str) -> dict:
    """One prompt's first token, in a fresh process running the code at ``src``."""
    code = WORKER.format(
        src=str(src), model=str(model), dtype=dtype, budget=budget, offload=offload, prompt_file=prompt_file
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True, timeout=3600
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_prompt(args: argparse.Namespace, model: Path) -> dict:
    """This checkout against ``--baseline-ref``, alternating, in RAM and with a disk tier."""
    baseline = Path(tempfile.mkdtemp(prefix="optdemo-baseline-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(baseline), args.baseline_ref], cwd=REPO_ROOT, check=True
    )
    text = prompt_text(model, args.prompt_tokens)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write(text)
    results: dict[str, Any] = {"baseline_ref": args.baseline_ref, "prompt_tokens": args.prompt_tokens}
    try:
        for where, budget in (("ram", ""), ("disk-tier", args.disk_memory)):
            runs: dict[str, list[dict]] = {"optdemo": [], "baseline": []}
            for _ in range(args.repeats):
                for side, src in (("baseline", baseline), ("optdemo", REPO_ROOT)):
                    offload = tempfile.mkdtemp(prefix="optdemo-offload-") if budget else ""
                    try:
                        runs[side].append(prompt_run(src, model, args.dtype, budget, offload, handle.name))
                    finally:
                        if offload:
                            shutil.rmtree(offload, ignore_errors=True)
            medians = {
                side: statistics.median(r["time_to_first_token"] for r in rs) for side, rs in runs.items()
            }
            results[where] = {
                "max_memory": budget or None,
                "runs": runs,
                "median_first_token_seconds": medians,
                "speedup": medians["baseline"] / medians["optdemo"],
                "same_first_token": len({tuple(r["token_ids"]) for rs in runs.values() for r in rs}) == 1,
            }
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO_ROOT, check=False)
        os.unlink(handle.name)
    return results


# ---------------------------------------------------------------------------------- memory
def run_memory(args: argparse.Namespace, model: Path) -> dict:
    """``--chats`` conversations at once under a memory cgroup; the cache must keep to its room."""
    from optdemo.core.budget import parse_max_memory
    from tools.memcap import MemoryCap

    budget = parse_max_memory(args.max_memory).as_max_memory()["cpu"]
    cap_bytes = budget + int(args.overhead_gib * 2**30)
    with MemoryCap(cap_bytes) as cap:
        app = App(["--model", str(model), "--dtype", args.dtype, "--max-memory", args.max_memory], cap.join())
        statuses, errors = [], []
        try:
            results: list[Any] = [None] * args.chats

            def chat(index: int) -> None:
                try:
                    results[index] = conversation(
                        app.url, args.turns, args.turn_words, args.max_tokens, index
                    )
                except Exception as exc:  # noqa: BLE001 - recorded; the others go on
                    errors.append(f"chat {index}: {exc}"[:300])

            threads = [threading.Thread(target=chat, args=(i,)) for i in range(args.chats)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                statuses.append(app.status().get("prefix_cache"))
                time.sleep(2)
            final = app.status()
        finally:
            app.close()
        report = cap.report()
    peaks = [s["bytes"] for s in statuses if s] + [0]
    cache = final.get("prefix_cache") or {}
    return {
        "command": app.command,
        "cap_bytes": report.limit_bytes,
        "budget_bytes": budget,
        "cgroup_peak_bytes": report.peak_bytes,
        "cap_hits": report.failcnt,
        "prefix_cache_peak_bytes": max(peaks),
        "prefix_cache_budget_bytes": cache.get("budget_bytes"),
        "prefix_cache_final": cache,
        "errors": errors,
        "conversations": results,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.chat_bench", description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=("chat", "prompt", "memory"))
    parser.add_argument("--build", default="opt-1.3b", help="a catalog architecture (random weights)")
    parser.add_argument("--model", help="an existing checkpoint folder instead of --build")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--max-memory", default="cpu=20GiB")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-words", type=int, default=200, help="words a turn adds (~2 tokens each)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--baseline-ref", default="e4ba474", help="the code to compare with")
    parser.add_argument("--disk-memory", default="cpu=1GiB", help="the budget of the disk-tier run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--overhead-gib", type=float, default=1.5, help="cap = cpu budget + this")
    parser.add_argument("--json", help="write the result here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = Path(args.model) if args.model else ensure_checkpoint(args.build, "safetensors", args.dtype)
    run = {"chat": run_chat, "prompt": run_prompt, "memory": run_memory}[args.scenario]
    started = time.time()
    result = {
        "scenario": args.scenario,
        "argv": sys.argv if argv is None else argv,
        "model": str(model),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        **run(args, model),
        "wall_seconds": time.time() - started,
    }
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(
        json.dumps(
            result.get("summary") or {k: v for k, v in result.items() if k != "sides"}, indent=2, default=str
        )[:4000]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
