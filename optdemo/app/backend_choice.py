"""Which backend answers chat and completion: the model on this machine, or a serving endpoint.

:class:`BackendChoice` holds the local :class:`~optdemo.runtime.manager.ModelManager` and, while
one is connected, an :class:`~optdemo.remote.endpoint_backend.EndpointBackend`; replies go to the
endpoint while it is connected, else to the local model. Connecting is an admin's act in public
mode, and only to the operator's endpoint with the operator's token: a visitor can never make the
server request a URL of their choice.
"""

from __future__ import annotations

from dataclasses import replace

from optdemo.app.access import AccessPolicy
from optdemo.app.sessions import SessionStore
from optdemo.app.settings import AppSettings
from optdemo.app.status import BackendStatus
from optdemo.core.backend import Backend
from optdemo.core.errors import AccessError
from optdemo.core.generation import GenerationStats
from optdemo.remote.client import EndpointConfig, EngineInfo, parse_endpoint
from optdemo.remote.endpoint_backend import EndpointBackend
from optdemo.runtime.manager import ModelManager


class BackendChoice:
    """The local model, or the serving endpoint connected in its place; one per service."""

    def __init__(
        self, manager: ModelManager, settings: AppSettings, access: AccessPolicy, sessions: SessionStore
    ) -> None:
        self.manager = manager
        self.settings = settings
        self.access = access
        self.sessions = sessions
        # The serving endpoint chat goes to instead of the local model, while one is connected.
        self.endpoint: EndpointBackend | None = None
        self._endpoint_stats: GenerationStats | None = None  # its latest reply's speed

    @property
    def active(self) -> Backend:
        """Where chat and completion go now: the connected endpoint, else the local model."""
        endpoint = self.endpoint
        return endpoint if endpoint is not None else self.manager

    def status(self) -> BackendStatus:
        """What answers now: the local model's status, or the endpoint's."""
        endpoint = self.endpoint
        if endpoint is not None:
            return BackendStatus.remote(endpoint.info, self._endpoint_stats)
        return BackendStatus.local(self.manager.status())

    def record(self, stats: GenerationStats) -> None:
        """Keep a finished reply's speed when the endpoint wrote it (the manager keeps its own)."""
        if self.endpoint is not None:
            self._endpoint_stats = stats

    def use_local(self) -> None:
        """The local model answers again (it was just loaded)."""
        self.endpoint = None

    def operator_endpoint(self) -> EndpointConfig | None:
        """The endpoint given at start (``--backend-url``, ``--backend-model``, ``--backend-token``)."""
        settings = self.settings
        if not settings.backend_url:
            return None
        return parse_endpoint(settings.backend_url, settings.backend_model, settings.backend_token)

    def endpoint_config(
        self, url: object, model: object = None, token: object = None, admin: str | None = None
    ) -> EndpointConfig:
        """The endpoint a form or call names, with this deployment's rules: in public mode only an
        admin (``admin``: the caller's admin credential) connects, and only to the operator's
        endpoint with the operator's token. An empty token or model with the operator's URL means
        the operator's.

        Raises:
            ConfigError: not a usable URL. AccessError: not allowed here.
        """
        self.access.require_admin(admin, "connect to a serving endpoint")
        config = parse_endpoint(url, model, token)
        operator = self.operator_endpoint()
        same = operator is not None and operator.url == config.url
        if self.settings.public and not same:
            where = f"its endpoint is {operator.url}" if operator else "it has none (--backend-url)"
            raise AccessError(
                f"only the operator chooses the serving endpoint of this public deployment: {where}"
            )
        if operator is not None and same:
            token = operator.token if self.settings.public or config.token is None else config.token
            config = replace(config, model=config.model or operator.model, token=token)
        return config

    def connect(self, config: EndpointConfig, admin: str | None = None) -> EngineInfo:
        """Check ``config``'s engine and make it answer chat and completion (admins only in public
        mode). Only once the engine answered is the local model unloaded, to free its memory.

        Raises:
            EndpointError: the engine cannot be used, in one sentence (the local model stays).
        """
        self.access.require_admin(admin, "connect to a serving endpoint")
        return self.connect_operator(config)

    def connect_operator(self, config: EndpointConfig) -> EngineInfo:
        """Connect as the operator said at start (no access check)."""
        backend = EndpointBackend.connect(config)
        self.manager.unload()
        self.endpoint, self._endpoint_stats = backend, None
        return backend.info

    def disconnect(self, admin: str | None = None) -> bool:
        """Stop using the serving endpoint, and the replies it is streaming (admins only in public
        mode); True if one was in use."""
        self.access.require_admin(admin, "disconnect the serving endpoint")
        was, self.endpoint = self.endpoint, None
        if was is not None:
            self.sessions.stop_all()  # as an unload stops the reply in progress
        return was is not None
