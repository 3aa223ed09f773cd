"""Where optdemo keeps what it builds and measures on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """optdemo's own cache (``$OPTDEMO_CACHE``, default ``~/.cache/optdemo``): the built-in tiny
    model, converted checkpoints, measured bandwidths and benchmark checkpoints."""
    return Path(os.environ.get("OPTDEMO_CACHE", Path.home() / ".cache" / "optdemo"))
