"""One function keeps secrets out of every text shown or logged: the known ones (the Hub token, what
the app registers) and anything shaped like a credential."""

from __future__ import annotations

import pytest

from optdemo.core import redact as redact_module
from optdemo.core.redact import redact, register_secret


@pytest.fixture(autouse=True)
def no_registered_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact_module, "_secrets", set())
    monkeypatch.delenv("HF_TOKEN", raising=False)


def test_the_hub_token_and_registered_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEtoken123")
    register_secret("s3cret-backend")
    register_secret("abc")  # too short to mask safely: ordinary words would vanish
    text = "x hf_FAKEtoken123 y s3cret-backend z abc"
    assert redact(text) == "x *** y *** z abc"
    assert redact("nothing to hide") == "nothing to hide"
    assert redact("token=longer-secret", "longer-secret") == "token=***"


@pytest.mark.parametrize(
    "leak",
    [
        "upstream said: Authorization: Bearer sk-live-1234567890",
        '{"headers": {"authorization": "Bearer sk-live-1234567890"}}',
        "401 for Bearer sk-live-1234567890 at /v1/chat",
        "token hf_abcdefghijklmnopqrstuvwxyz was refused",
    ],
)
def test_credentials_are_masked_by_their_shape(leak: str) -> None:
    shown = redact(leak)
    assert "sk-live-1234567890" not in shown and "hf_abcdefghijklmnopqrstuvwxyz" not in shown
    assert "***" in shown


def test_non_text_is_turned_into_text() -> None:
    assert redact(ValueError("Bearer abc.def")) == "Bearer ***"
