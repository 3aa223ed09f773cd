"""The Hugging Face Space folder: complete, consistent with the repository, and importable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "space"))

from build import build_space  # noqa: E402


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_space(tmp_path_factory.mktemp("space") / "optdemo-space")


def _pinned(package: str) -> str:
    text = (ROOT / "requirements.txt").read_text()
    return re.search(rf"^{package}(?:\[[\w,]+\])?==([\w.]+)$", text, re.MULTILINE).group(1)  # extras allowed


def test_space_has_everything_it_runs(space):
    assert {p.name for p in space.iterdir()} == {"README.md", "app.py", "requirements.txt", "optdemo"}
    assert (space / "app.py").read_text() == (ROOT / "app.py").read_text()
    assert (space / "requirements.txt").read_text() == (ROOT / "requirements.txt").read_text()
    for source in (ROOT / "optdemo").rglob("*.py"):
        assert (space / source.relative_to(ROOT)).read_text() == source.read_text()
    assert (space / "optdemo" / "core" / "configs" / "opt-66b.json").exists()
    assert not list(space.rglob("__pycache__"))


def test_space_metadata_matches_the_repository(space):
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(space / "README.md")
    data = card.data.to_dict()
    assert data["sdk"] == "gradio"
    assert data["sdk_version"] == _pinned("gradio")
    assert data["app_file"] == "app.py" and (space / data["app_file"]).exists()
    assert data["python_version"] == "3.11"
    assert data["suggested_hardware"].startswith(("t4", "l4", "a10g", "a100", "l40s", "h100"))
    assert "facebook/opt-66b" in data["models"] and len(data["models"]) == 8
    assert 0 < len(data["short_description"]) <= 60
    assert "ZeroGPU" in card.text


def test_space_app_imports_and_starts_locked(space):
    code = (
        "import app, os; from optdemo.app.settings import parse_settings; "
        "s = parse_settings([], env={'SPACE_ID': 'user/optdemo', 'OPTDEMO_MODEL': 'opt-125m'}); "
        "from optdemo.web.blocks import create_app; demo, service = create_app(s); "
        "print(s.public, s.lock_config, s.preload, service.initial_config().model, "
        "service.is_admin('visitor'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=space, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-5:] == ["True", "True", "True", "facebook/opt-125m", "False"]
