"""Putting tensors into modules, and counting their bytes: what the offloading tiers share.

Accelerate, the memory-mapped disk tier, the streamed disk tier and the GPU prefetcher all swap the
tensors a module computes with (host copies, mapped views, streamed buffers, device copies) without
touching the module's code. One function does that swap, so every tier treats parameters and buffers
alike.
"""

from __future__ import annotations

from typing import Any


def assign_tensors(module: Any, tensors: dict[str, Any]) -> int:
    """Make ``tensors`` (names relative to ``module``, dotted for submodules) the module's
    parameters or buffers, without gradients; returns their bytes."""
    import torch

    for full_name, tensor in tensors.items():
        owner_name, _, leaf = full_name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    return sum(t.numel() * t.element_size() for t in tensors.values())


def module_bytes(model: Any, name: str) -> int:
    """Weight bytes of one device-map entry (parameters and buffers; meta tensors count by size)."""
    return entries_bytes(model, [name])


def entries_bytes(model: Any, names: list[str]) -> int:
    """Weight bytes of several device-map entries, each tensor counted once (a tied LM head and
    the embeddings share one)."""
    tensors = {}
    for name in names:
        module = model.get_submodule(name)
        tensors.update({id(t): t for t in [*module.parameters(), *module.buffers()]})
    return sum(t.numel() * t.element_size() for t in tensors.values())
