"""The one place optdemo calls a private transformers function, behind a version check.

The planner must make exactly the device-map decision ``from_pretrained(device_map="auto")`` makes,
and transformers offers that only as the private
``transformers.integrations.accelerate._get_device_map``. Private functions change without notice,
so the call goes through :func:`auto_device_map`, which checks that the function is still there with
the signature we tested, warns when the installed transformers is outside the tested range, and
otherwise fails with a message that says what to do.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from optdemo.core.errors import PlanError

if TYPE_CHECKING:
    from torch import nn

# The transformers releases this adapter was tested with: [first, last) (requirements.txt pins 5.23.0).
TESTED_TRANSFORMERS = (Version("5.23.0"), Version("5.24.0"))
PINNED_TRANSFORMERS = "5.23.0"
# _get_device_map(model, device_map, max_memory, hf_quantizer) in the tested releases.
_EXPECTED_PARAMETERS = ("model", "device_map", "max_memory", "hf_quantizer")


class TransformersCompatError(PlanError):
    """The installed transformers no longer offers the private call the planner relies on."""


def installed_transformers() -> Version:
    """The installed transformers version (read from its metadata, without importing it)."""
    return Version(importlib.metadata.version("transformers"))


def auto_device_map(model: nn.Module, max_memory: dict[int | str, int] | None) -> dict[str, int | str]:
    """transformers' own ``device_map="auto"`` decision for ``model`` (on the meta device) under
    ``max_memory`` (bytes per device; None: all free memory), without a quantizer: the same call
    ``from_pretrained`` makes, so a plan equals the load.

    Raises:
        TransformersCompatError: the private function is gone or its signature changed.
    """
    get_device_map = _private_get_device_map()
    return dict(get_device_map(model, "auto", max_memory, None))


def _private_get_device_map() -> Callable[..., Any]:
    """transformers' private ``_get_device_map``, once its presence and signature are checked."""
    version = installed_transformers()
    from transformers.integrations import accelerate as hf_accelerate  # heavy: imports torch

    function = getattr(hf_accelerate, "_get_device_map", None)
    parameters = tuple(inspect.signature(function).parameters) if callable(function) else None
    if parameters != _EXPECTED_PARAMETERS:
        found = "is missing" if parameters is None else f"now takes ({', '.join(parameters)})"
        raise TransformersCompatError(
            f"transformers {version} changed a private function optdemo's planner relies on "
            f"(transformers.integrations.accelerate._get_device_map {found}): install the tested "
            f"release with pip install transformers=={PINNED_TRANSFORMERS}, and please report it to "
            "optdemo's issue tracker with your transformers version"
        )
    first, last = TESTED_TRANSFORMERS
    if not first <= version < last:
        warnings.warn(
            f"transformers {version} is outside the range optdemo was tested with ({first} up to "
            f"{last}); plans use its private _get_device_map, which still has the expected "
            f"signature. If a plan and a load disagree, pip install transformers=={PINNED_TRANSFORMERS}.",
            stacklevel=3,
        )
    return function
