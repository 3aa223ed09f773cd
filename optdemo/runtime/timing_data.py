"""What :mod:`optdemo.runtime.timing` measured, as plain data: per block of the plan, per reply.

A reply has two phases that are different workloads: its prompt pass (many tokens of one
sequence) and its decode steps (one token per running reply each). Each phase holds, for every
block of the plan (embeddings, each decoder layer, the final norm, the LM head), the wall time
spent inside the block, the part of it spent waiting for the block's weights, and the bytes moved
for it. A decode step shared by several replies counts fully for each of them: its time is what
each of them waited for its token. ``to_dict`` is the JSON of ``/status`` and of the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a block waited for (``BlockTiming.waits_for``), as the instrumented tiers report it.
DISK = "disk"  # reads of the offload files: the streamed tier, Accelerate's own per-forward loads
PAGE_FAULTS = "page faults"  # memory-mapped weights read in from disk while the block computed
COPY = "host-to-device copy"  # weights copied to the GPU (the prefetcher, Accelerate's hooks)

_DIGITS = 6  # seconds in the JSON: microseconds


@dataclass(frozen=True)
class BlockTiming:
    """One block's share of a phase: the wall time inside it, the part spent waiting for its
    weights (the rest is computing), and the bytes moved for it (read from storage, copied to the
    GPU)."""

    name: str
    seconds: float
    wait_seconds: float
    disk_bytes: int
    copy_bytes: int
    waits_for: str = ""  # DISK, PAGE_FAULTS, COPY, or "" when it never waited

    @property
    def compute_seconds(self) -> float:
        """The wall time not spent waiting for weights."""
        return max(0.0, self.seconds - self.wait_seconds)

    def to_dict(self) -> dict:
        """Plain data for the JSON."""
        return {
            "block": self.name,
            "seconds": round(self.seconds, _DIGITS),
            "wait_seconds": round(self.wait_seconds, _DIGITS),
            "compute_seconds": round(self.compute_seconds, _DIGITS),
            "disk_bytes": self.disk_bytes,
            "copy_bytes": self.copy_bytes,
            "waits_for": self.waits_for,
        }


@dataclass(frozen=True)
class PhaseTiming:
    """The prompt pass or the decode steps of one reply: how many forward passes, how many tokens
    they computed (every row's), their wall time, and each block's share."""

    passes: int
    tokens: int
    seconds: float  # the passes' wall time, from the model's forward call to its return
    blocks: tuple[BlockTiming, ...]

    @property
    def blocks_seconds(self) -> float:
        """The time inside the blocks."""
        return sum(block.seconds for block in self.blocks)

    @property
    def between_blocks_seconds(self) -> float:
        """The passes' time outside every block: the model's own code between them (attention
        masks, positions, the loop)."""
        return max(0.0, self.seconds - self.blocks_seconds)

    @property
    def wait_seconds(self) -> float:
        """The time the blocks waited for their weights."""
        return sum(block.wait_seconds for block in self.blocks)

    @property
    def disk_bytes(self) -> int:
        """Bytes read from storage for the blocks."""
        return sum(block.disk_bytes for block in self.blocks)

    @property
    def copy_bytes(self) -> int:
        """Bytes copied to the GPU for the blocks."""
        return sum(block.copy_bytes for block in self.blocks)

    def to_dict(self) -> dict:
        """Plain data for the JSON: the totals, then the blocks."""
        return {
            "passes": self.passes,
            "tokens": self.tokens,
            "seconds": round(self.seconds, _DIGITS),
            "blocks_seconds": round(self.blocks_seconds, _DIGITS),
            "between_blocks_seconds": round(self.between_blocks_seconds, _DIGITS),
            "wait_seconds": round(self.wait_seconds, _DIGITS),
            "disk_bytes": self.disk_bytes,
            "copy_bytes": self.copy_bytes,
            "blocks": [block.to_dict() for block in self.blocks],
        }


@dataclass(frozen=True)
class ReplyTiming:
    """Where one reply's time went: its prompt pass, its decode steps, the rest, and the floor
    that moving its weights sets at this machine's measured rates."""

    prompt: PhaseTiming
    decode: PhaseTiming
    reply_seconds: float  # from leaving the line to its end (GenerationStats' total less the wait)
    waited_seconds: float  # in line, before the engine took it
    batch: int = 1  # most replies sharing one of its decode steps (each step counts for all)
    disk_rate: float | None = None  # bytes/s this machine reads from disk (plan/bandwidth.py)
    copy_rate: float | None = None  # bytes/s it copies to the GPU, None without one

    @property
    def blocks_seconds(self) -> float:
        """The time inside the blocks, both phases."""
        return self.prompt.blocks_seconds + self.decode.blocks_seconds

    @property
    def wait_seconds(self) -> float:
        """The time the blocks waited for their weights, both phases."""
        return self.prompt.wait_seconds + self.decode.wait_seconds

    @property
    def outside_passes_seconds(self) -> float:
        """The reply's time outside its forward passes: its prompt's preparation, sampling, its
        text, the engine's bookkeeping, and other replies' prompt passes between its steps."""
        return max(0.0, self.reply_seconds - self.prompt.seconds - self.decode.seconds)

    @property
    def wait_share(self) -> float:
        """The share of the blocks' time spent waiting for weights (0 with no block time)."""
        return self.wait_seconds / self.blocks_seconds if self.blocks_seconds else 0.0

    @property
    def waits_for(self) -> str:
        """What the blocks waited for most ('' when they never waited)."""
        kinds: dict[str, float] = {}
        for block in (*self.prompt.blocks, *self.decode.blocks):
            if block.waits_for:
                kinds[block.waits_for] = kinds.get(block.waits_for, 0.0) + block.wait_seconds
        return max(kinds, key=kinds.get) if kinds else ""  # type: ignore[arg-type]

    @property
    def seconds_per_token(self) -> float | None:
        """A decode step's wall time (None without decode steps)."""
        return self.decode.seconds / self.decode.passes if self.decode.passes else None

    @property
    def moved_per_token(self) -> tuple[float, float]:
        """(bytes read from storage, bytes copied to the GPU) per decode step."""
        steps = self.decode.passes
        return (self.decode.disk_bytes / steps, self.decode.copy_bytes / steps) if steps else (0.0, 0.0)

    @property
    def floor_seconds_per_token(self) -> float | None:
        """The fastest a decode step could be given the bytes it moved and the rates this machine
        was measured at; None when it moved nothing (or a rate is unknown)."""
        disk, copy = self.moved_per_token
        if not disk and not copy:
            return None
        if (disk and not self.disk_rate) or (copy and not self.copy_rate):
            return None
        return (disk / self.disk_rate if disk else 0.0) + (copy / self.copy_rate if copy else 0.0)  # type: ignore[operator]

    def block_names(self) -> list[str]:
        """The blocks, in the plan's order."""
        return [block.name for block in (self.decode.blocks or self.prompt.blocks)]

    def to_dict(self) -> dict:
        """The latest reply's timing in ``/status`` and a benchmark run's in its JSON."""
        return {
            "reply_seconds": round(self.reply_seconds, _DIGITS),
            "waited_seconds": round(self.waited_seconds, _DIGITS),
            "blocks_seconds": round(self.blocks_seconds, _DIGITS),
            "outside_passes_seconds": round(self.outside_passes_seconds, _DIGITS),
            "wait_share": round(self.wait_share, 4),
            "waits_for": self.waits_for,
            "batch": self.batch,
            "seconds_per_token": self.seconds_per_token,
            "disk_bytes_per_token": self.moved_per_token[0],
            "copy_bytes_per_token": self.moved_per_token[1],
            "floor_seconds_per_token": self.floor_seconds_per_token,
            "prompt": self.prompt.to_dict(),
            "decode": self.decode.to_dict(),
        }


@dataclass(frozen=True)
class Progress:
    """The forward pass running now: how far through the decoder layers, since when."""

    mode: str  # "prompt" or "step"
    tokens: int  # tokens the pass computes (every row's)
    layers_done: int
    layers: int
    elapsed: float  # seconds since the pass began

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left, at the pace of the layers done so far (None before the first one)."""
        if not self.layers_done:
            return None
        return self.elapsed * max(0, self.layers - self.layers_done) / self.layers_done

    def to_dict(self) -> dict:
        """Plain data for the JSON."""
        eta = self.eta_seconds
        return {
            "mode": self.mode,
            "tokens": self.tokens,
            "layers_done": self.layers_done,
            "layers": self.layers,
            "elapsed_seconds": round(self.elapsed, 3),
            "eta_seconds": None if eta is None else round(eta, 3),
        }


@dataclass(frozen=True)
class TimingReport:
    """What the loaded model's timer knows now: the latest reply's timing, how many replies it
    timed since the load (it changes when a reply ends), and the pass running now."""

    latest: ReplyTiming | None
    replies: int
    progress: Progress | None = None

    def to_dict(self) -> dict:
        """The ``timing`` field of ``/status``."""
        return {
            "replies_timed": self.replies,
            "latest_reply": None if self.latest is None else self.latest.to_dict(),
            "progress": None if self.progress is None else self.progress.to_dict(),
        }
