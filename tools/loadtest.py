"""Load test: N concurrent chat clients x M messages against a running optdemo, over loopback only.

    python -m tools.loadtest --clients 8 --messages 3            # launches its own app (tiny model)
    python -m tools.loadtest --url http://127.0.0.1:7860 --clients 4

Each client is a separate ``gradio_client`` session (its own chat history) calling ``/chat``. The
run is bounded in count and time (``--deadline``), refuses any address outside 127.0.0.0/8 or ::1,
and reports completed / failed requests and p50 / p95 latency.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from optdemo.app.settings import AppSettings

MAX_CLIENTS = 64
MAX_MESSAGES = 50


@dataclass
class LoadTestResult:
    """Outcome of a run; latencies in seconds per completed request."""

    clients: int
    messages: int
    completed: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    answered: list[tuple[int, int]] = field(default_factory=list)  # (client, message), as answered
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # From the first request sent to the last reply received: the aggregate throughput's time,
    # without the clients' connecting (None until a request completes).
    span_seconds: float | None = None
    replies: dict[str, str] = field(default_factory=dict)  # "client/message" -> the reply's text

    @property
    def p50(self) -> float | None:
        """Median latency."""
        return _percentile(self.latencies, 50)

    @property
    def p95(self) -> float | None:
        """95th-percentile latency."""
        return _percentile(self.latencies, 95)

    def summary(self) -> str:
        """One line for people."""
        p50 = f"{self.p50:.2f}s" if self.p50 is not None else "-"
        p95 = f"{self.p95:.2f}s" if self.p95 is not None else "-"
        return (
            f"{self.clients} clients x {self.messages} messages: {self.completed} completed, "
            f"{self.failed} failed, p50 {p50}, p95 {p95}, {self.seconds:.1f}s total"
            + (f", {self.span_seconds:.1f}s from first request to last reply" if self.span_seconds else "")
        )


def _percentile(values: Sequence[float], percent: int) -> float | None:
    """The ``percent``-th percentile of ``values``, interpolated between the closest ranks (the
    "inclusive" method: it never leaves the range of the measured values); None without values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def check_loopback(url: str) -> None:
    """Refuse any target that is not this machine's loopback interface."""
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            raise ValueError(f"refusing to load-test {host} ({address}): only loopback addresses are allowed")


def run_load_test(
    url: str,
    clients: int = 4,
    messages: int = 2,
    max_new_tokens: int = 8,
    deadline_seconds: float = 120.0,
) -> LoadTestResult:
    """Run ``clients`` concurrent sessions, each sending ``messages`` chat messages in turn.

    Args:
        url: the app's address (loopback only).
        clients: concurrent sessions (at most 64).
        messages: messages per session (at most 50).
        max_new_tokens: reply length; small keeps the run short.
        deadline_seconds: requests still unanswered then count as failed.
    """
    from gradio_client import Client

    check_loopback(url)
    if not 1 <= clients <= MAX_CLIENTS or not 1 <= messages <= MAX_MESSAGES:
        raise ValueError(f"clients must be 1..{MAX_CLIENTS} and messages 1..{MAX_MESSAGES}")
    result = LoadTestResult(clients, messages)
    lock = threading.Lock()
    started = time.perf_counter()
    moments: list[float] = []  # every request's sending and answering time
    deadline = started + deadline_seconds

    def session(index: int) -> None:
        try:
            client = Client(url, verbose=False)
            client.predict(api_name="/clear_chat")
        except Exception as exc:  # noqa: BLE001 - counted, reported, and the run goes on
            with lock:
                result.failed += messages
                result.errors.append(f"client {index}: {exc}")
            return
        for turn in range(messages):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                with lock:
                    result.failed += 1
                    result.errors.append(f"client {index}: deadline passed before message {turn}")
                continue
            asked = time.perf_counter()
            try:
                job = client.submit(
                    f"Hello from client {index}, message {turn}", max_new_tokens, 0.0, 0.9, api_name="/chat"
                )
                reply = job.result(timeout=remaining)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    result.failed += 1
                    result.errors.append(f"client {index} message {turn}: {type(exc).__name__}: {exc}"[:300])
                continue
            with lock:
                answered = time.perf_counter()
                moments.extend((asked, answered))
                result.completed += 1
                result.latencies.append(answered - asked)
                result.answered.append((index, turn))
                result.replies[f"{index}/{turn}"] = reply if isinstance(reply, str) else str(reply)

    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.perf_counter()) + 5)
    result.seconds = time.perf_counter() - started
    result.span_seconds = max(moments) - min(moments) if moments else None
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exits 1 when any request failed."""
    parser = argparse.ArgumentParser(prog="python -m tools.loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running app on loopback; default: launch one with the tiny model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for the whole run")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    demo = service = None
    url = args.url
    if url is None:
        from optdemo.web.blocks import create_app, launch  # gradio: only when the tool launches its own app

        demo, service = create_app(AppSettings(model="optdemo/tiny-opt", preload=True))
        service.manager.load(service.initial_config())
        _, url, _ = launch(demo, service, prevent_thread_lock=True, quiet=True)
    try:
        result = run_load_test(url, args.clients, args.messages, args.max_new_tokens, args.deadline)
    finally:
        if demo is not None:
            service.manager.unload()
            demo.close()
    print(result.summary())
    for error in result.errors[:10]:
        print(f"  {error}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({**asdict(result), "p50": result.p50, "p95": result.p95}, handle, indent=2)
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
