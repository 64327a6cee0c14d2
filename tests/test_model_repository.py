"""The model-repository format: which folders are versions, what a manifest must hold, what a version may point at."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from model_repository import (
    MANIFEST,
    Manifest,
    RepositoryError,
    VersionError,
    discard,
    list_models,
    list_versions,
    open_version,
    parse_version,
    prepare,
    publish,
    read_manifest,
    version_dir,
    write_manifest,
)

from .conftest import ROOT


@pytest.fixture
def repo(tmp_path, tiny_repo):
    """A private copy of the exported tiny model, as REPO/tiny/1, free to break."""
    shutil.copytree(tiny_repo / "tiny" / "1", tmp_path / "models" / "tiny" / "1")
    return tmp_path / "models"


def _rewrite(folder, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(("name", "version"), [
    ("1", 1), ("007", 7), ("9223372036854775807", 2**63 - 1), ("9223372036854775808", None),
    ("99999999999999999999", None), ("0", None), ("-1", None), (" 1", None), ("1 ", None), ("²", None),
    ("١", None), ("abc", None), ("", None), ("1" * 5000, None),
])
def test_parse_version_takes_ascii_numbers_in_range(name, version):
    assert parse_version(name) == version


def test_odd_entries_are_ignored_and_logged_once(tmp_path, caplog):
    model = tmp_path / "m"
    for name in ("1", "12", "²", "99999999999999999999", "007", "abc", "4", ".staging-x"):
        (model / name).mkdir(parents=True)
    for name in ("1", "12", "²", "99999999999999999999", "007", ".staging-x"):
        (model / name / MANIFEST).write_text("{}")
    (model / "3").write_text("a file, not a folder")
    caplog.set_level(logging.WARNING, logger="model_repository")

    warned: set = set()  # a server's scans share one set, so each odd entry is logged once
    assert list_versions(tmp_path, "m", warned) == [1, 12]
    assert list_versions(tmp_path, "m", warned) == [1, 12]  # a second scan logs nothing new
    assert list_models(tmp_path, warned) == ["m"]
    assert list_versions(tmp_path, "m") == [1, 12]  # without a set: debug level only

    odd = ["²", "99999999999999999999", "007", "abc", "4", "3"]
    for name in odd:
        hits = [r for r in caplog.records if r.getMessage().startswith(f"ignoring {model / name} ")]
        assert len(hits) == 1, (name, [r.getMessage() for r in caplog.records])
        assert hits[0].levelno == logging.WARNING and "(rule: " in hits[0].getMessage()
    assert len(caplog.records) == len(odd)  # hidden staging folders are skipped silently


def test_models_are_folders_holding_a_version(repo):
    (repo / "empty").mkdir()
    (repo / ".hidden" / "1").mkdir(parents=True)
    (repo / ".hidden" / "1" / MANIFEST).write_text("{}")
    assert list_models(repo) == ["tiny"]
    assert list_models(repo / "missing") == []
    assert list_versions(repo, "missing") == [] and list_versions(repo, "../models/tiny") == []
    assert version_dir(repo, "tiny", 1) == repo / "tiny" / "1"
    for name, version in (("../etc", 1), ("tiny", 0), ("tiny", True)):
        with pytest.raises(RepositoryError):
            version_dir(repo, name, version)


def test_a_published_version_opens_and_round_trips(repo):
    folder = repo / "tiny" / "1"
    manifest = open_version(folder)
    assert manifest.path == folder / MANIFEST and manifest.version == 1 and manifest.name == "tiny"
    assert manifest.model.head_dim == manifest.model.d_model // manifest.model.n_heads
    assert manifest.graphs["decoder"].input_names()[:2] == ("input_ids", "positions")
    assert "cross_attn" in manifest.graphs["decoder_attn"].output_names()
    assert manifest.file(manifest.tokenizer) == folder / "tokenizer.json"
    raw = read_manifest(folder)
    assert manifest.to_dict() == raw
    assert json.loads(json.dumps(manifest.to_dict())) == raw
    assert Manifest.from_dict(manifest.to_dict(), manifest.path) == manifest


def _set_n_heads(value):
    return lambda m: m["model_config"].__setitem__("n_heads", value)


@pytest.mark.parametrize(("change", "field", "expected"), [
    (lambda m: m.pop("attention_blocks"), "attention_blocks", "a list, it is missing"),
    (lambda m: m["graphs"].pop("decoder"), "graphs.decoder", "it is missing"),
    (_set_n_heads("4"), "model_config.n_heads", "expected an integer >= 1, got a string '4'"),
    (_set_n_heads(True), "model_config.n_heads", "got true"),
    (_set_n_heads(3), "model_config.n_heads", "a divisor of model_config.d_model (32)"),
    (lambda m: m["graphs"]["decoder"]["inputs"][2].pop("name"), "graphs.decoder.inputs[2].name", "missing"),
    (lambda m: m["attention_blocks"][0].update(kind="sideways"), "attention_blocks[0].kind", "one of encoder_self"),
    (lambda m: m.update(version=0), "version", "an integer 1..9223372036854775807"),
    (lambda m: m["files"].update({"tokenizer.json": "not a digest"}), "files['tokenizer.json']", "sha256"),
])
def test_a_bad_field_is_refused_by_name(repo, change, field, expected):
    folder = repo / "tiny" / "1"
    _rewrite(folder, change)
    with pytest.raises(VersionError) as info:
        open_version(folder)
    assert info.value.rule == "field" and info.value.path == folder / MANIFEST
    assert str(info.value).startswith(f"{folder / MANIFEST}: {field}: expected ")
    assert expected in str(info.value) and "(rule: field)" in str(info.value)


def test_another_format_version_is_refused_plainly(repo):
    folder = repo / "tiny" / "1"
    _rewrite(folder, lambda m: m.update(format_version=3))
    with pytest.raises(VersionError, match="format_version is 3, and this attnserve reads format 2 only") as info:
        open_version(folder)
    assert info.value.rule == "format-version"


@pytest.mark.parametrize("where", ["../../etc/passwd", "/etc/passwd", "sub/../../1/encoder.onnx"])
def test_a_graph_outside_the_folder_is_refused(repo, where):
    folder = repo / "tiny" / "1"
    _rewrite(folder, lambda m: m["graphs"]["decoder"].update(file=where))
    with pytest.raises(VersionError) as info:
        open_version(folder, verify_checksums=False)
    assert info.value.rule == "containment"
    assert f"graphs.decoder.file = {where!r}" in str(info.value)


def test_a_symlink_out_of_the_folder_is_refused(repo, tmp_path):
    folder = repo / "tiny" / "1"
    outside = tmp_path / "elsewhere.json"
    shutil.copy(folder / "tokenizer.json", outside)  # same bytes: only where it lives is wrong
    (folder / "tokenizer.json").unlink()
    os.symlink(outside, folder / "tokenizer.json")
    with pytest.raises(VersionError, match="tokenizer = 'tokenizer.json'.*outside the folder") as info:
        open_version(folder)
    assert info.value.rule == "containment"


def test_a_symlink_inside_the_folder_is_fine(repo):
    folder = repo / "tiny" / "1"
    (folder / "tokenizer.json").rename(folder / "real.json")
    os.symlink("real.json", folder / "tokenizer.json")
    assert open_version(folder).tokenizer == "tokenizer.json"
    with pytest.raises(VersionError, match="'..' component"):
        open_version(folder).file("../1/tokenizer.json")


def test_a_used_file_missing_from_files_is_refused(repo):
    folder = repo / "tiny" / "1"
    _rewrite(folder, lambda m: m["files"].pop("tokenizer.json"))
    with pytest.raises(VersionError, match="tokenizer = 'tokenizer.json' is not listed in files") as info:
        open_version(folder, verify_checksums=False)
    assert info.value.rule == "unlisted-file"


def test_a_changed_byte_fails_the_checksum(repo):
    folder = repo / "tiny" / "1"
    data = bytearray((folder / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(VersionError, match="sha256") as info:
        open_version(folder)
    assert info.value.rule == "checksum" and info.value.path == folder / "encoder.onnx"
    assert str(info.value).startswith(str(folder / "encoder.onnx"))
    assert open_version(folder, verify_checksums=False).version == 1  # serving may skip the hashing
    (folder / "encoder.onnx").unlink()
    with pytest.raises(VersionError, match="cannot be read") as info:
        open_version(folder)
    assert info.value.rule == "checksum"


def test_a_copy_under_another_number_is_refused(repo):
    (repo / "tiny" / "1").rename(repo / "tiny" / "2")
    with pytest.raises(VersionError, match="the manifest says version 1 but the folder is 2") as info:
        open_version(repo / "tiny" / "2")
    assert info.value.rule == "version-mismatch"


@pytest.mark.parametrize(("text", "why"), [(None, "no manifest.json"), ("{", "unreadable"),
                                           ("[1, 2]", "expected a JSON object, got a list")])
def test_a_missing_or_unreadable_manifest_is_refused(repo, text, why):
    folder = repo / "tiny" / "1"
    if text is None:
        (folder / MANIFEST).unlink()
    else:
        (folder / MANIFEST).write_text(text)
    with pytest.raises(VersionError, match=why) as info:
        open_version(folder)
    assert info.value.rule == "manifest" and info.value.path == folder / MANIFEST


def test_write_manifest_checks_before_writing(repo, tmp_path):
    source = repo / "tiny" / "1"
    raw = read_manifest(source)
    target = tmp_path / "out"
    version, staging = prepare(target, "tiny", None)
    for name in raw["files"]:
        shutil.copy(source / name, staging / name)
    fields = {k: v for k, v in raw.items() if k not in ("format_version", "files")}

    broken = {**fields, "graphs": {k: v for k, v in fields["graphs"].items() if k != "decoder_attn"}}
    with pytest.raises(VersionError, match="graphs.decoder_attn") as info:
        write_manifest(staging, broken)
    assert info.value.path == staging / MANIFEST and not (staging / MANIFEST).exists()
    discard(staging)
    assert list_versions(target, "tiny") == [] and list(target.joinpath("tiny").iterdir()) == []

    version, staging = prepare(target, "tiny", None)
    for name in raw["files"]:
        shutil.copy(source / name, staging / name)
    (staging / "tokenizer.json").unlink()  # the manifest would name a file the version lacks
    with pytest.raises(VersionError, match="not listed in files") as info:
        write_manifest(staging, fields)
    assert info.value.rule == "unlisted-file" and not (staging / MANIFEST).exists()
    shutil.copy(source / "tokenizer.json", staging / "tokenizer.json")

    write_manifest(staging, fields)
    final = publish(staging, target, "tiny", version)
    assert final == target / "tiny" / "1" and open_version(final).to_dict() == raw
    assert list_versions(target, "tiny") == [1]


def test_the_package_needs_only_the_standard_library():
    script = ("import sys; before = set(sys.modules); import model_repository; "
              "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
              "print(sorted(new - set(sys.stdlib_module_names) - {'model_repository'}))")
    r = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_version_under_another_model_name_is_refused(repo):
    shutil.move(repo / "tiny", repo / "renamed")
    with pytest.raises(VersionError, match="manifest says model 'tiny' but the folder is 'renamed'") as e:
        open_version(repo / "renamed" / "1")
    assert e.value.rule == "name-mismatch"
