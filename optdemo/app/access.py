"""Who may do what: the deployment's access rules, in one place.

Outside public mode the person at the machine is the admin and everything is allowed. In public
mode (``--share``, ``--lock-config``, or a Hugging Face Space; see :class:`AppSettings.public`)
visitors may chat and preview plans of the allowed models, and only the holders of an admin
credential may load, unload or clear the conversion cache. A credential is issued by
:meth:`AccessPolicy.sign_in` for an ``--auth`` account and lives in
:class:`~optdemo.app.admin_sessions.AdminSessions` (random, expiring, revocable); a call that
carries none is a visitor's, whatever session it claims. Offload folders are confined under
``--offload-base`` (always in public mode). Refusals say the true reason and the remedy.
"""

from __future__ import annotations

import hmac
import os
import time

from optdemo.app.admin_sessions import AdminGrant, AdminSessions, Clock, SignInLimiter
from optdemo.app.settings import AppSettings
from optdemo.core.catalog import OPT_SIZES, TINY_MODEL_ID
from optdemo.core.defaults import describe_seconds
from optdemo.core.errors import AccessError
from optdemo.core.load_config import LoadConfig, normalize_model


class AccessPolicy:
    """The deployment's access rules, its live admin credentials and its sign-in limit;
    thread-safe. ``clock`` (monotonic seconds) drives expiry and waits: tests pass their own."""

    def __init__(self, settings: AppSettings, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.admins = AdminSessions(clock=clock)
        self.limiter = SignInLimiter(clock=clock)

    # ---------------------------------------------------------------- admins
    def is_admin(self, credential: str | None) -> bool:
        """Whether the holder of ``credential`` (an admin token, or None) may change the
        configuration: always outside public mode, else only with a live credential."""
        if not self.settings.public:
            return True
        return self.admins.valid(credential)

    def sign_in(self, client: str, username: object, password: object) -> AdminGrant:
        """A new admin credential, if the username and password match one ``--auth`` account
        (compared in constant time, every account checked) and ``client`` (the caller's address)
        is not waiting after too many failures.

        Raises:
            TooManySignInsError: during a wait, even with the right password; says how long.
            AccessError: wrong username or password (saying so, and the wait it now imposes).
        """
        self.limiter.check(client)
        typed_user, typed_secret = _bytes(username), _bytes(password)
        ok = False
        for user, secret in self.settings.auth:
            same_user = hmac.compare_digest(typed_user, _bytes(user))
            ok |= same_user & hmac.compare_digest(typed_secret, _bytes(secret))
        if not ok:
            wait = self.limiter.failed(client)
            if wait:
                raise AccessError(
                    "wrong username or password, and too many failed sign-ins from your address: "
                    f"try again in {describe_seconds(wait)}"
                )
            raise AccessError("wrong username or password: check them and sign in again")
        self.limiter.succeeded(client)
        return self.admins.issue(str(username))

    def sign_out(self, credential: str | None) -> bool:
        """End ``credential``; True if it was a live one."""
        return self.admins.revoke(credential)

    def require_admin(self, credential: str | None, action: str) -> None:
        """Refuse ``action`` (e.g. "unload the model") unless ``credential`` is an admin's.

        Raises:
            AccessError: saying why visitors are refused here and what would allow it.
        """
        if not self.is_admin(credential):
            raise AccessError(f"visitors cannot {action}: {self.public_reason()}; {self.remedy()}")

    def public_reason(self) -> str:
        """Why this deployment is in public mode, as the settings say."""
        settings = self.settings
        if settings.on_space:
            return "this app runs on a Hugging Face Space, where anyone can reach it"
        if settings.share and settings.lock_config:
            return (
                "this app is shared with a public link (--share) and its configuration is locked "
                "(--lock-config)"
            )
        if settings.share:
            return "this app is shared with a public link (--share)"
        return "the configuration is locked (--lock-config)"

    def remedy(self) -> str:
        """What would allow a configuration change: signing in, or the operator restarting."""
        settings = self.settings
        if settings.auth:
            return "sign in as an admin to change it"
        if settings.on_space:
            return (
                "the operator must add an admin account (the OPTDEMO_AUTH secret, USER:PASS) and "
                "restart the Space, or run the app off the Space"
            )
        without = " and ".join(
            flag for flag, on in (("--share", settings.share), ("--lock-config", settings.lock_config)) if on
        )
        return f"the operator must restart the app with --auth USER:PASS, or without {without}"

    # ---------------------------------------------------------------- what visitors may name
    def allowed_models(self, credential: str | None = None) -> tuple[str, ...]:
        """Models the caller may name in public mode: for visitors the ``--allow-model`` entries,
        else the configured one; for holders of an admin ``credential`` :meth:`admin_models`."""
        if self.settings.public and credential is not None and self.is_admin(credential):
            return self.admin_models()
        names = self.settings.allow_models or (self.settings.model,)
        return tuple(normalize_model(name) for name in names)

    def admin_models(self) -> tuple[str, ...]:
        """Models a signed-in admin may plan and load: ``--admin-allow-model`` entries, else the
        visitors' models plus the catalog's OPT sizes and tiny-opt. A local folder or another Hub
        repository is allowed only when the operator lists it."""
        if self.settings.admin_allow_models:
            return tuple(dict.fromkeys(normalize_model(name) for name in self.settings.admin_allow_models))
        catalog = (TINY_MODEL_ID, *(normalize_model(name) for name in OPT_SIZES))
        return tuple(dict.fromkeys((*self.allowed_models(), *catalog)))

    def check_config(self, config: LoadConfig, credential: str | None = None) -> None:
        """Refuse, in public mode, a model the caller may not name, or a tokenizer or draft model of
        a visitor's choice (an admin's must be one of the admins' models).

        Raises:
            AccessError: naming what is allowed.
        """
        if not self.settings.public:
            return
        admin = credential is not None and self.is_admin(credential)
        allowed = self.allowed_models(credential if admin else None)
        if config.model not in allowed:
            who = "admins of this public deployment may use" if admin else "this public deployment allows"
            remedy = (
                "; the operator can allow more with --admin-allow-model"
                if admin
                else ("; an admin may use more" if self.settings.auth else "")
            )
            raise AccessError(f"{config.model} is not offered here: {who} {', '.join(allowed)}{remedy}")
        if config.tokenizer is not None and not (admin and config.tokenizer in allowed):
            raise AccessError("visitors cannot choose another tokenizer in this public deployment")
        if config.draft_model is not None and not (admin and config.draft_model in allowed):
            raise AccessError("visitors cannot choose a draft model in this public deployment")

    def confine_offload(self, folder: str | None) -> str | None:
        """The offload folder to use for ``folder``: kept under ``--offload-base`` (always in public
        mode), ``..`` and symlinks resolved first; None for an empty field.

        Raises:
            AccessError: the folder lies outside the base.
        """
        if not folder or not folder.strip():
            return None
        candidate = folder.strip()
        base = self.settings.confined_offload_base
        if base is None:
            return candidate
        base_real = os.path.realpath(base)
        target = os.path.realpath(
            candidate if os.path.isabs(candidate) else os.path.join(base_real, candidate)
        )
        if os.path.commonpath([base_real, target]) != base_real:
            raise AccessError(
                f"the offload folder must be inside {base_real}: {candidate[:80]!r} is outside it"
            )
        return target


def _bytes(text: object) -> bytes:
    """``text`` as bytes for a constant-time comparison (any string, lone surrogates included)."""
    return str(text).encode("utf-8", "surrogatepass")
