"""The project's own error types.

Every error a user can meet is an ``OptdemoError`` whose message is a sentence that says what went
wrong and what to do next. The UI turns these into ``gr.Error``; anything else reaching the UI is a
bug and is reported as one.
"""

from __future__ import annotations


class OptdemoError(Exception):
    """Base class: a problem the user can act on; ``str(err)`` is the message to show."""


class BudgetError(OptdemoError, ValueError):
    """A max_memory specification that cannot be parsed or used on this machine."""


class ConfigError(OptdemoError, ValueError):
    """A load configuration that is invalid or cannot be resolved (unknown model, bad dtype...)."""


class PlanError(OptdemoError):
    """The model cannot be placed with the given budget and offload folder."""


class LoadError(OptdemoError):
    """Loading failed (network, gated repository, corrupt checkpoint, out of memory, disk full)."""


class SupersededError(LoadError):
    """A load that had not started yet was replaced by a newer load request (of another model)."""


class GenerationError(OptdemoError, ValueError):
    """Invalid generation parameters, or generation requested with no model loaded."""


class NoModelError(GenerationError):
    """Generation was requested while no model is loaded (the UI says where to load one)."""


class BusyError(OptdemoError):
    """The model is busy (loading or generating) and the request could not wait."""


class AccessError(OptdemoError):
    """A visitor tried something only an admin may do in public mode, or named something this
    deployment does not offer (a model, a tokenizer, an offload folder outside its base)."""


class CacheInUseError(OptdemoError):
    """The conversion cache cannot be cleared while the loaded model reads from it."""


class NoModelForVisitorsError(NoModelError):
    """No model is loaded, and this visitor of a public deployment cannot load one."""


class EndpointError(OptdemoError):
    """A serving endpoint (the remote backend) cannot be reached, refused a request, or stopped in
    the middle of a reply; the message names the endpoint and what to do."""
