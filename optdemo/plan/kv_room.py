"""Memory for a batch of replies: the KV cache each running sequence keeps, against the budget.

Every decoder layer caches a key and a value vector (``hidden_size`` numbers each) per token of
every running sequence, in the load dtype, on the layer's device. So a sequence of L tokens holds
``layers x 2 x hidden x L x dtype bytes``, each layer's share where the layer computes: on its
GPU, else in RAM. The room for it is what the budget leaves next to the weights on those devices;
when the map spills weights to disk (the memory-mapped tier is page cache the OS may drop), the RAM
available beyond the cpu budget counts too, since the cache lives in RAM and the disk tier's pages
give way to it. The plan states how many sequences of
the model's full context length fit; the engine decodes at most min(``--max-batch``, that) together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optdemo.core.budget import Device, format_bytes

# The plan counts out at most this many sequences ("room for over 1000"): beyond it, the number
# says nothing a person can use.
MAX_STATED_SEQUENCES = 1000


@dataclass(frozen=True)
class BatchRoom:
    """How many full-length sequences the KV cache has room for next to the weights."""

    bytes_per_token: int  # KV bytes one token of one sequence adds (all layers, keys and values)
    context_length: int  # the model's window (tokens)
    room_bytes: int  # memory the budget leaves for the KV cache (beyond_budget_bytes included)
    sequences: int  # sequences of context_length tokens that fit in room_bytes
    # Of room_bytes, the RAM available beyond the cpu budget: it counts only when weights spill to
    # disk, since the disk tier's page cache gives way to the KV cache.
    beyond_budget_bytes: int = 0

    @property
    def bytes_per_sequence(self) -> int:
        """KV bytes of one sequence of the full context length."""
        return self.bytes_per_token * self.context_length

    def text(self, max_batch: int | None = None) -> str:
        """One line for the plan, e.g. ``KV cache: 192 KiB per 2048-token sequence; the budget
        leaves 3 GiB next to the weights, room for 2 such sequences at once (--max-batch 8: 2
        decoded together)``. Where the room comes from is said as it is (the budget, or RAM beyond
        it); no room for one sequence says that visitors are served one at a time, and why; a room
        larger than the batch is not counted out."""
        inside = self.room_bytes - self.beyond_budget_bytes
        line = (
            f"KV cache: {format_bytes(self.bytes_per_sequence)} per {self.context_length}-token "
            f"sequence; the budget leaves {format_bytes(inside)} next to the weights"
        )
        if self.beyond_budget_bytes:
            line += (
                f", and RAM beyond the budget ({format_bytes(self.beyond_budget_bytes)} available now) "
                "holds the cache too, since the disk tier's pages give way to it"
            )
        if self.sequences == 0:
            return line + (
                ": less than one such sequence, so visitors are served one at a time (a long "
                "conversation may outgrow the budget); give the model more memory to serve several at once"
            )
        if max_batch is not None and self.sequences > max_batch:
            line += f", room for more such sequences than the batch (--max-batch {max_batch}: "
            line += f"{max_batch} decoded together)"
        else:
            count = (
                self.sequences if self.sequences <= MAX_STATED_SEQUENCES else f"over {MAX_STATED_SEQUENCES}"
            )
            line += f", room for {count} such sequence{'s' if self.sequences != 1 else ''} at once"
            if max_batch is not None:
                line += f" (--max-batch {max_batch}: {batch_in_force(max_batch, self)} decoded together)"
        if max_batch is not None:
            cached = self.prompt_cache_bytes(max_batch)
            line += (
                f"; {format_bytes(cached)} left for prompt caches (a conversation's next turn reuses them)"
                if cached
                else "; no room left for prompt caches: every prompt is computed whole"
            )
        return line

    def prompt_cache_bytes(self, max_batch: int) -> int:
        """What the running replies cannot use of the room, in the worst case (the batch in force,
        each at the full context): the prompt caches kept for the next prompts may hold it."""
        return max(0, self.room_bytes - batch_in_force(max_batch, self) * self.bytes_per_sequence)

    def to_dict(self) -> dict:
        """The plan JSON's ``batch`` entry."""
        return {
            "kv_bytes_per_token": self.bytes_per_token,
            "kv_bytes_per_sequence": self.bytes_per_sequence,
            "context_length": self.context_length,
            "room_bytes": self.room_bytes,
            "sequences": self.sequences,
        }


def kv_bytes_per_token(model_config: Any, dtype_bytes: int) -> int:
    """KV bytes one token adds to one sequence: layers x 2 (key, value) x hidden x dtype bytes."""
    config = (
        model_config.get_text_config(decoder=True)
        if hasattr(model_config, "get_text_config")
        else model_config
    )
    return int(config.num_hidden_layers) * 2 * int(config.hidden_size) * dtype_bytes


def batch_room(
    model_config: Any,
    dtype_bytes: int,
    context_length: int,
    budget: dict[Device, int],
    bytes_per_device: dict[Device, int],
    ram_available: int,
    layer_devices: Sequence[Device | None] = (),
) -> BatchRoom:
    """The room the plan leaves for the KV cache, and how many full sequences fit in it.

    A layer's cache lives where the layer's activations do: on its GPU, else in RAM (layers on
    the CPU or the disk tier). Each such device must hold its layers' share of every sequence, so
    the sequences that fit are the fewest any of them has room for.

    Args:
        model_config: the model's config (layers, hidden size).
        dtype_bytes: bytes per number in the load dtype (the cache's dtype).
        context_length: the model's window (tokens).
        budget: bytes each device may hold (the plan's effective budget).
        bytes_per_device: the weights' bytes on each device.
        ram_available: RAM available now (bytes); counts beyond the cpu budget when weights
            spill to disk.
        layer_devices: the device of each decoder layer (the plan's layer blocks); empty: all
            in RAM.
    """
    per_token = kv_bytes_per_token(model_config, dtype_bytes)
    layers = len(layer_devices) or 1
    share: dict[Device, int] = {}  # layers whose cache each device holds
    for device in layer_devices or ["cpu"]:
        home: Device = device if isinstance(device, int) else "cpu"
        share[home] = share.get(home, 0) + 1
    rooms = {device: max(0, budget.get(device, 0) - bytes_per_device.get(device, 0)) for device in share}
    beyond = 0
    if "cpu" in rooms and bytes_per_device.get("disk", 0):
        beyond = max(0, ram_available - budget.get("cpu", 0))
        rooms["cpu"] += beyond
    per_sequence = per_token * context_length
    sequences = min(rooms[d] * layers // (per_sequence * share[d]) for d in share)
    return BatchRoom(per_token, context_length, sum(rooms.values()), sequences, beyond)


def batch_in_force(max_batch: int, room: BatchRoom | None) -> int:
    """The batch size the engine uses: the flag, lowered to what the KV room holds (at least one)."""
    return max_batch if room is None else max(1, min(max_batch, room.sequences))
