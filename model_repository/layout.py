"""Which folders of a model repository are models and versions, where a version's files may live, and their sha256."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: the decoder step takes and gives its caches one tensor per layer
MAX_VERSION = 2**63 - 1  # versions travel as int64 on the wire
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() accepts "²", which int() then refuses


class RepositoryError(RuntimeError):
    """The repository cannot take this version: bad name, version taken, or not writable."""


class VersionError(RepositoryError):
    """A version folder that breaks one of the format's rules; `rule` is a short id such as "checksum"."""

    def __init__(self, path: Path, rule: str, detail: str) -> None:
        self.path = Path(path)
        self.rule = rule
        self.detail = detail
        super().__init__(f"{self.path}: {detail} (rule: {rule})")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def valid_name(name: str) -> bool:
    """A model name: letters, digits, '_', '-', '.', at most 64, not starting with a dot (no '..', no '/')."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: str) -> None:
    if not valid_name(name):
        raise RepositoryError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (max 64)")


def parse_version(name: str) -> int | None:
    """The number a folder name stands for (ASCII digits, 1..2**63-1), else None. "007" parses as 7, but
    `list_versions` ignores it: a version folder is named without leading zeros, so each number has one folder."""
    if not _DIGITS.fullmatch(name) or len(name.lstrip("0")) > len(str(MAX_VERSION)):
        return None  # the length test also keeps int() clear of its limit on very long digit strings
    value = int(name)
    return value if 1 <= value <= MAX_VERSION else None


def _ignore(path: Path, rule: str, why: str, warned: set[Path] | None) -> None:
    if warned is None:
        log.debug("ignoring %s in the model repository: %s (rule: %s)", path, why, rule)
    elif path not in warned:
        warned.add(path)
        log.warning("ignoring %s in the model repository: %s (rule: %s)", path, why, rule)


def list_versions(repo: Path, name: str, warned: set[Path] | None = None) -> list[int]:
    """The published versions of `name`, ascending: folders named by their number that hold a manifest.

    Anything else in the model folder is ignored: logged as a warning once per path in `warned` (a server that
    scans every few seconds keeps one set), at debug level without it. Hidden entries (".staging-*") silently.
    """
    model_dir = Path(repo) / name
    if not valid_name(name) or not model_dir.is_dir():
        return []
    found = []
    for entry in sorted(model_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        version = parse_version(entry.name)
        if version is None:
            _ignore(entry, "version-name", f"a version folder is named by an integer 1..{MAX_VERSION}", warned)
        elif entry.name != str(version):
            _ignore(entry, "version-name", f"a version folder is named without leading zeros ({version})", warned)
        elif not entry.is_dir():
            _ignore(entry, "version-name", "a version is a folder, this is a file", warned)
        elif not (entry / MANIFEST).is_file():
            _ignore(entry, "manifest", f"no {MANIFEST} (the last file a version gets; a copy may be in progress)",
                    warned)
        else:
            found.append(version)
    return sorted(found)


def list_models(repo: Path, warned: set[Path] | None = None) -> list[str]:
    """The models of the repository, by name: its non-hidden folders that hold at least one version."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    names = []
    for entry in sorted(repo.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if not valid_name(entry.name):
            _ignore(entry, "model-name", "a model name is letters, digits, '_', '-', '.' (max 64)", warned)
        elif list_versions(repo, entry.name, warned):
            names.append(entry.name)
    return names


def version_dir(repo: Path, name: str, version: int) -> Path:
    check_name(name)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise RepositoryError(f"invalid version {version!r}: an integer 1..{MAX_VERSION}")
    return Path(repo) / name / str(version)


def contained(folder: Path, relative: object, field: str, manifest: Path) -> Path:
    """`folder / relative`, once sure it stays inside `folder`, symlinks followed; else VersionError "containment"."""
    def refuse(why: str) -> VersionError:
        return VersionError(manifest, "containment", f"{field} = {relative!r} {why}; a version's files lie "
                                                     f"inside its own folder {folder}")

    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise refuse("is not a file name")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or Path(relative).is_absolute():
        raise refuse("is an absolute path")
    if ".." in pure.parts:
        raise refuse("has a '..' component")
    try:
        root = Path(folder).resolve()
        target = (Path(folder) / relative).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop: RuntimeError before Python 3.13, OSError after
        raise refuse(f"cannot be resolved ({e})") from e
    if target == root or not target.is_relative_to(root):
        raise refuse(f"resolves to {target}, outside the folder")
    return Path(folder) / relative
