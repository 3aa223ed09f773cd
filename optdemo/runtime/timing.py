"""Where the time of every forward pass goes, per block of the plan: the record of a pass, what the
tiers report into it, and what the engine reads out of it.

The contract. Once :func:`optdemo.runtime.timing_hooks.install` has put its hooks on a loaded
model, every forward pass of the model (the batching engine's, or ``generate``'s) is measured,
for every block of its plan (embeddings, each decoder layer, the final norm, the LM head):

* **wall time**: from the block's call to its return (on a GPU, CUDA events on the compute
  stream, read once at the end of the pass; elsewhere ``time.perf_counter``);
* **waiting for its weights**, the part of the wall time the tier serving them reports here
  (:func:`stamp`, then :func:`waited`): the streamed disk tier's wait for the block's buffer, the
  compute stream's wait for the block's copy to the GPU, Accelerate's offload hooks' loads and
  copies; for a block in RAM or memory-mapped, the page faults' share, as
  :mod:`optdemo.runtime.timing_hooks` says how it is estimated;
* **compute**, the rest; and **bytes moved** for it: read from storage, copied to the GPU.

A pass is charged to the replies the engine names around it (:func:`charged_to`: a batched decode
step belongs whole to each of its replies); :func:`finish` turns a reply's passes into a
:class:`~optdemo.runtime.timing_data.ReplyTiming`, kept as the model's latest, :func:`report`
says that and how far the pass in flight got, and :func:`recording` collects every pass for a
benchmark. Measuring only reads clocks and counters: no result changes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from optdemo.runtime.batching import kernels
from optdemo.runtime.timing_data import (
    BlockTiming,
    PhaseTiming,
    Progress,
    ReplyTiming,
    TimingReport,
)

PROMPT, STEP = kernels.PROMPT, kernels.STEP

_local = threading.local()  # .run: the pass measured on this thread; .charged: the replies it serves
_replies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine request -> _Reply
_process_io: int | None = None  # /proc/self/io, opened once (-1: not available here)
_admitted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine request -> perf_counter


def open_io(path: str) -> int:
    """A descriptor on an I/O accounting file of /proc (-1 where there is none)."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return -1


def read_bytes(fd: int | None = None) -> int:
    """Bytes read from storage (page-cache hits excluded) by this process, or by the thread whose
    ``/proc`` io file ``fd`` is; 0 where the kernel does not say. One ``pread`` of an open file:
    2 to 8 microseconds, more with more threads in the process (the kernel sums them)."""
    global _process_io
    if fd is None:
        if _process_io is None:
            _process_io = open_io("/proc/self/io")
        fd = _process_io
    if fd < 0:
        return 0
    try:
        data = os.pread(fd, 512, 0)
    except OSError:  # the thread is gone
        return 0
    at = data.find(b"read_bytes: ")
    return int(data[at + 12 : data.index(b"\n", at)]) if at >= 0 else 0


class PassRecord:
    """One forward pass being measured (by a :class:`~optdemo.runtime.timing_hooks.BlockTimer`): per
    block, wall time, wait, bytes, and what it waited for."""

    def __init__(self, timer: Any, mode: str, tokens: int) -> None:
        count = len(timer.names)
        self.timer, self.mode, self.tokens = timer, mode, tokens
        self.wall, self.wait = [0.0] * count, [0.0] * count
        self.disk, self.copy = [0] * count, [0] * count
        self.kind = [""] * count
        self.reported = [False] * count  # a tier reported a wait for the block in this pass
        self.events: list[tuple[int, Any, Any]] = []  # (block, start, end): GPU-side waits
        self.on_gpu: list[int] = []  # blocks timed by CUDA events in this pass
        self.block = -1  # the block running now
        self.begun = 0.0
        self.sampling = False  # whether the blocks' reads from storage are measured in this pass
        self.read_from = self.reads_at = 0  # storage reads when the block, and the pass, began
        self.ahead: dict[int, int] = {}  # id(block module) -> bytes read ahead for it (hints)
        self.layers_done = 0
        self.nested = 0  # calls of the model inside this pass (part of it)
        self.seconds = 0.0
        self.started = time.perf_counter()


class _Phase:
    """The sum of a reply's passes of one kind (prompt or decode steps)."""

    def __init__(self, count: int) -> None:
        self.passes = self.tokens = 0
        self.seconds = 0.0
        self.wall, self.wait = [0.0] * count, [0.0] * count
        self.disk, self.copy = [0] * count, [0] * count
        self.kind = [""] * count

    def add(self, run: PassRecord) -> None:
        self.passes += 1
        self.tokens += run.tokens
        self.seconds += run.seconds
        self.wall = [a + b for a, b in zip(self.wall, run.wall, strict=True)]
        self.wait = [a + b for a, b in zip(self.wait, run.wait, strict=True)]
        self.disk = [a + b for a, b in zip(self.disk, run.disk, strict=True)]
        self.copy = [a + b for a, b in zip(self.copy, run.copy, strict=True)]
        self.kind = [new or old for old, new in zip(self.kind, run.kind, strict=True)]

    def freeze(self, names: list[str]) -> PhaseTiming:
        blocks = tuple(
            BlockTiming(name, *values)
            for name, *values in zip(
                names, self.wall, self.wait, self.disk, self.copy, self.kind, strict=True
            )
        )
        return PhaseTiming(self.passes, self.tokens, self.seconds, blocks)


class _Reply:
    """The passes charged to one reply (or to a benchmark's recording) so far."""

    def __init__(self, timer: Any, started: float) -> None:
        self.timer, self.started = timer, started
        self.prompt, self.decode = _Phase(len(timer.names)), _Phase(len(timer.names))
        self.batch = 1

    def add(self, run: PassRecord, batch: int) -> None:
        if run.mode == PROMPT:
            self.prompt.add(run)
        else:
            self.decode.add(run)
            self.batch = max(self.batch, batch)

    def freeze(self, ended: float, submitted: float) -> ReplyTiming:
        names = self.timer.names
        return ReplyTiming(
            self.prompt.freeze(names),
            self.decode.freeze(names),
            reply_seconds=ended - self.started,
            waited_seconds=max(0.0, self.started - submitted),
            batch=self.batch,
            disk_rate=self.timer.disk_rate,
            copy_rate=self.timer.copy_rate,
        )


def current() -> PassRecord | None:
    """The pass measured on this thread now, if any."""
    return getattr(_local, "run", None)


def begin(timer: Any, mode: str, tokens: int) -> PassRecord | None:
    """Start measuring a pass of ``timer``'s model on this thread; None when one is measured
    already (the model called inside its own pass belongs to that pass)."""
    run = current()
    if run is not None:
        run.nested += 1
        return None
    run = timer.run = _local.run = PassRecord(timer, mode, tokens)
    return run


def end(timer: Any) -> PassRecord | None:
    """Stop measuring ``timer``'s pass on this thread; returns it (None when it was not running)."""
    run = current()
    if run is None or run.timer is not timer:
        return None
    if run.nested:
        run.nested -= 1
        return None
    _local.run = timer.run = None
    return run


def charge(run: PassRecord) -> None:
    """Add a finished pass to the replies it served (:func:`charged_to`: each whole) and to the
    recordings of its model (:func:`recording`)."""
    charged = getattr(_local, "charged", None) or ()
    for request in charged:
        reply = _replies.get(request)
        if reply is None:  # its first pass: the reply began when it left the line (or now)
            reply = _replies[request] = _Reply(run.timer, _admitted.pop(request, run.started))
        reply.add(run, len(charged))
    for recording in run.timer.recordings:
        recording.add(run, 1)


# ---------------------------------------------------------------------------------- the tiers' side
def stamp(device: Any = None) -> Any:
    """Now, for a wait about to be measured by :func:`waited` (None when no pass is measured on
    this thread, so an unmeasured model pays one attribute lookup): a CUDA event recorded on the
    compute stream when ``device`` is a GPU, else ``time.perf_counter()``."""
    if current() is None:
        return None
    if getattr(device, "type", None) == "cuda":
        import torch

        stream = torch.cuda.current_stream(device)
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event, stream
    return time.perf_counter()


def waited(started: Any, kind: str, disk_bytes: int = 0, copy_bytes: int = 0) -> None:
    """The block running now waited for its weights since ``started`` (:func:`stamp`'s), for
    ``kind`` (``DISK``, ``COPY``), and moved these bytes for them."""
    run = current()
    if started is None or run is None or run.block < 0:
        return
    index = run.block
    if isinstance(started, float):
        run.wait[index] += time.perf_counter() - started
    else:
        import torch

        start, stream = started
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        run.events.append((index, start, end))
    run.disk[index] += disk_bytes
    run.copy[index] += copy_bytes
    run.kind[index] = kind
    run.reported[index] = True


def read_ahead(module: Any, hint: Any, *args: Any) -> None:
    """Run ``hint(*args)``, a tier asking the OS to read ``module``'s weights ahead, and count the
    bytes it had read from storage as ``module``'s (its own block's, whichever block runs now)."""
    run = current()
    if run is None or not run.sampling:
        hint(*args)
        return
    before = run.timer.storage_reads()
    hint(*args)
    read = run.timer.storage_reads() - before
    if read > 0:
        run.ahead[id(module)] = run.ahead.get(id(module), 0) + read


# ---------------------------------------------------------------------------------- the engine's side
@contextlib.contextmanager
def charged_to(requests: Sequence[Any]) -> Iterator[None]:
    """The passes run inside belong to ``requests`` (the engine's, one per reply), each whole."""
    previous = getattr(_local, "charged", None)
    _local.charged = requests
    try:
        yield
    finally:
        _local.charged = previous


def admitted(request: Any) -> None:
    """``request`` (the engine's) leaves the line now: from here on its time is its reply's."""
    _admitted[request] = time.perf_counter()


def finish(request: Any, ended: float) -> ReplyTiming | None:
    """The timing of ``request``'s reply, which ended at ``ended`` (``perf_counter``), kept as its
    model's latest; None when none of its passes was measured."""
    reply = _replies.pop(request, None)
    _admitted.pop(request, None)
    if reply is None:
        return None
    result = reply.freeze(ended, request.submitted)
    reply.timer.latest = result
    reply.timer.replies += 1
    return result


class Recording:
    """Every pass of a model between the start and the end of :func:`recording`."""

    def __init__(self, timer: Any) -> None:
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.reply = None if timer is None else _Reply(timer, self.started)

    def result(self) -> ReplyTiming | None:
        """What was recorded (None on a model without a timer)."""
        if self.reply is None:
            return None
        return self.reply.freeze(self.ended or time.perf_counter(), self.started)


@contextlib.contextmanager
def recording(model: Any) -> Iterator[Recording]:
    """Record every forward pass of ``model`` inside (a benchmark's generation, say)."""
    timer = getattr(model, "_optdemo_timer", None)
    record = Recording(timer)
    if timer is not None:
        timer.recordings.append(record.reply)
    try:
        yield record
    finally:
        record.ended = time.perf_counter()
        if timer is not None:
            timer.recordings.remove(record.reply)


def report(model: Any) -> TimingReport | None:
    """What ``model``'s timer knows now (None when it has none): the latest reply, and the pass
    running now with how far it got."""
    timer = getattr(model, "_optdemo_timer", None) if model is not None else None
    if timer is None:
        return None
    run = timer.run
    progress = None
    if run is not None:
        elapsed = time.perf_counter() - run.started
        progress = Progress(run.mode, run.tokens, run.layers_done, timer.layers, elapsed)
    return TimingReport(timer.latest, timer.replies, progress)
