"""What the app reports as its status: the local model's, or a serving endpoint's in its place.

The runtime's :class:`~optdemo.runtime.status.ModelStatus` knows only the model on this machine;
while a serving endpoint answers instead (:mod:`optdemo.remote`), the app reports that endpoint
through the same fields, so the tabs, ``/status`` and the OpenAI API need not ask which backend is
active.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from optdemo.core.generation import GenerationStats
from optdemo.remote.client import EngineInfo
from optdemo.runtime.status import ModelStatus


@dataclass(frozen=True)
class BackendStatus(ModelStatus):
    """A :class:`ModelStatus`, or (``endpoint`` set, ``config`` None) the serving endpoint in use."""

    __hash__ = None  # type: ignore[assignment]  # holds dicts; compared by value, never hashed

    endpoint: EngineInfo | None = None

    @classmethod
    def local(cls, status: ModelStatus) -> BackendStatus:
        """The local model's status, as it is."""
        return cls(**{f.name: getattr(status, f.name) for f in fields(ModelStatus)})

    @classmethod
    def remote(cls, info: EngineInfo, last_stats: GenerationStats | None) -> BackendStatus:
        """A serving endpoint in use, with its latest reply's speed."""
        return cls(None, endpoint=info, last_stats=last_stats)

    @property
    def loaded(self) -> bool:
        """Whether a model answers: loaded here, or served by a connected endpoint."""
        return self.config is not None or self.endpoint is not None

    @property
    def display_name(self) -> str | None:
        """The model's name for people (the endpoint's model name), or None."""
        return self.endpoint.model if self.endpoint is not None else super().display_name

    @property
    def model_id(self) -> str | None:
        """The model's id: the loaded model's, or the one the endpoint serves; None without one."""
        return self.endpoint.model if self.endpoint is not None else super().model_id

    def to_dict(self) -> dict:
        """The ``/status`` JSON: the model's, and which backend answers."""
        return {
            **super().to_dict(),
            "backend": "endpoint" if self.endpoint is not None else "local",
            "endpoint": None if self.endpoint is None else self.endpoint.to_dict(),
        }
