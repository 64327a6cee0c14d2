"""Writing a version: a hidden staging folder beside its final place, the manifest last, an atomic rename.

A version is built in `REPO/NAME/.staging-*` and renamed to `REPO/NAME/VERSION` only after validation, so a
reader sees either no version or a whole one. `manifest.json` is the last file written, and it is checked with
the same rules serving applies before it is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .layout import FORMAT_VERSION, MANIFEST, RepositoryError, check_name, list_versions, sha256_file, version_dir
from .manifest import Manifest, check_folder


def prepare(repo: Path, name: str, version: int | None) -> tuple[int, Path]:
    """Check the target and create a staging folder; returns (version, staging dir)."""
    check_name(name)
    model_dir = Path(repo) / name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        staging.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read it
    except OSError as e:
        raise RepositoryError(f"cannot write to the model repository {repo}: {e.strerror or e}") from e
    existing = list_versions(repo, name)
    if version is None:
        version = (existing[-1] + 1) if existing else 1
    elif version < 1:
        discard(staging)
        raise RepositoryError(f"--version must be a positive integer, got {version}")
    try:
        final = version_dir(repo, name, version)
    except RepositoryError:
        discard(staging)
        raise
    if final.exists():
        discard(staging)
        raise RepositoryError(f"{final} already exists; versions are immutable, pick another")
    return version, staging


def write_manifest(staging: Path, manifest: dict) -> None:
    """Add format_version and every staged file's sha256, check the result as serving will, then write it."""
    staging = Path(staging)
    final = {"format_version": FORMAT_VERSION, **manifest,
             "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.name != MANIFEST}}
    check_folder(Manifest.from_dict(final, staging / MANIFEST), verify_checksums=False)  # sums: computed just now
    (staging / MANIFEST).write_text(json.dumps(final, indent=2, ensure_ascii=False), encoding="utf-8")


def publish(staging: Path, repo: Path, name: str, version: int) -> Path:
    """Rename the staging folder into place (atomic on one filesystem); refuses to overwrite."""
    final = version_dir(repo, name, version)
    try:
        os.rename(staging, final)  # fails if final exists and is non-empty
    except OSError as e:
        discard(staging)
        raise RepositoryError(f"cannot publish {final}: {e.strerror or e}") from e
    return final


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
