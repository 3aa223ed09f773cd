"""The offline OPT catalog: the eight facebook/opt-* configurations, shipped as package data.

Planning needs only a model's configuration, never its weights, so with these files every OPT size
can be planned with no network. The numbers in ``configs/catalog.json`` were computed from these
configs (unique parameters, tied lm_head counted once) and match the published model sizes; the
checkpoints on the Hub's main branches are float16 ``pytorch_model*.bin`` shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

# The model the app offers when nothing else is asked for, and the one that works offline.
TINY_MODEL_ID = "optdemo/tiny-opt"
OPT_SIZES = ("opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b")


@dataclass(frozen=True)
class CatalogEntry:
    """One OPT size: its Hub repository, unique parameter count and float16 checkpoint size."""

    name: str
    repo_id: str
    parameters: int
    checkpoint_bytes: int
    checkpoint_dtype: str
    checkpoint_format: str


@cache
def catalog() -> dict[str, CatalogEntry]:
    """All catalog entries by short name (``opt-1.3b``), smallest first."""
    raw = json.loads(_config_file("catalog.json").read_text())
    return {name: CatalogEntry(name=name, **fields) for name, fields in raw.items()}


def catalog_entry(model: str) -> CatalogEntry | None:
    """The entry for ``opt-1.3b`` or ``facebook/opt-1.3b`` (any case), or ``None``."""
    key = model.strip().lower().removeprefix("facebook/")
    return catalog().get(key)


def catalog_config_dict(model: str) -> dict:
    """The shipped ``config.json`` of a catalog model, as a dict (a fresh copy each call)."""
    entry = catalog_entry(model)
    if entry is None:
        raise KeyError(f"{model!r} is not in the OPT catalog ({', '.join(OPT_SIZES)})")
    return json.loads(_config_file(f"{entry.name}.json").read_text())


def _config_file(name: str):
    return resources.files("optdemo.core").joinpath("configs", name)
