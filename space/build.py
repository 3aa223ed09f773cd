"""Assemble (and optionally upload) the Hugging Face Space from this repository.

    python space/build.py build/space                      # assemble into a folder
    python space/build.py build/space --upload user/optdemo  # and push it with huggingface_hub

The Space runs the repository's own ``app.py`` and ``optdemo/`` package, copied as they are, with
``requirements.txt``; only the Space's README (its YAML metadata) lives in ``space/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the Space needs from the repository, copied verbatim.
FILES = ("app.py", "requirements.txt")
PACKAGE = "optdemo"


def build_space(dest: str | Path) -> Path:
    """Write the Space into ``dest`` (emptied first): README with metadata, app, package,
    requirements. Returns the folder."""
    dest = Path(dest).resolve()
    # Never wipe the repository itself or one of its source folders.
    if dest in (ROOT, ROOT / PACKAGE, ROOT / "space", ROOT / "tests") or dest in ROOT.parents:
        raise ValueError(f"refusing to build the Space over {dest}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "space" / "README.md", dest / "README.md")
    for name in FILES:
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / PACKAGE, dest / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def upload_space(folder: Path, repo_id: str) -> str:
    """Create the Space if needed and upload the folder; returns the Space's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", exist_ok=True)
    api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="space", commit_message="Deploy optdemo"
    )
    return f"https://huggingface.co/spaces/{repo_id}"


def main(argv: list[str] | None = None) -> int:
    """Command line: build, then upload when --upload names a Space."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dest", nargs="?", default=str(ROOT / "build" / "space"))
    parser.add_argument(
        "--upload", metavar="USER/SPACE", help="push to this Space (needs HF_TOKEN or hf auth login)"
    )
    args = parser.parse_args(argv)
    folder = build_space(args.dest)
    print(f"Space assembled in {folder}")
    if args.upload:
        print(f"Uploaded: {upload_space(folder, args.upload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
