"""The model repository on disk: `REPO/NAME/VERSION/` with integer versions, published atomically.

A version is built in a hidden staging folder beside its final place (`REPO/NAME/.staging-VERSION-*`) and
renamed into place only after validation, so a reader sees either no version or a whole one. `manifest.json` is
the last file written and the only one serving reads about the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RepositoryError(RuntimeError):
    """The repository cannot take this version: bad name, version taken, or not writable."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions(repo: Path, name: str) -> list[int]:
    d = Path(repo) / name
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit() and (p / MANIFEST).is_file())


def prepare(repo: Path, name: str, version: int | None) -> tuple[int, Path]:
    """Check the target and create a staging folder; returns (version, staging dir)."""
    if not _NAME.match(name):
        raise RepositoryError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (max 64)")
    model_dir = Path(repo) / name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        staging.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read it
    except OSError as e:
        raise RepositoryError(f"cannot write to the model repository {repo}: {e.strerror or e}") from e
    existing = versions(repo, name)
    if version is None:
        version = (existing[-1] + 1) if existing else 1
    elif version < 1:
        shutil.rmtree(staging, ignore_errors=True)
        raise RepositoryError(f"--version must be a positive integer, got {version}")
    if (model_dir / str(version)).exists():
        shutil.rmtree(staging, ignore_errors=True)
        raise RepositoryError(f"{model_dir / str(version)} already exists; versions are immutable, pick another")
    return version, staging


def write_manifest(staging: Path, manifest: dict) -> None:
    manifest = {"format_version": FORMAT_VERSION, **manifest,
                "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.name != MANIFEST}}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")


def publish(staging: Path, repo: Path, name: str, version: int) -> Path:
    """Rename the staging folder into place (atomic on one filesystem); refuses to overwrite."""
    final = Path(repo) / name / str(version)
    try:
        os.rename(staging, final)  # fails if final exists and is non-empty
    except OSError as e:
        discard(staging)
        raise RepositoryError(f"cannot publish {final}: {e.strerror or e}") from e
    return final


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def read_manifest(version_dir: Path) -> dict:
    return json.loads((Path(version_dir) / MANIFEST).read_text(encoding="utf-8"))
