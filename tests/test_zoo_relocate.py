"""A zoo built from a `[data] path` may be resumed or grown after its data file moved (same content, other path).

Tiny zoos (16 training images at 32×32, one benign entry, one epoch) so the file stays within a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from testbed.cli import main
from testbed.data.h5data import content_hash
from testbed.data.synth import make_synth_dataset
from testbed.zoo.build import prepare
from testbed.zoo.spec import parse_spec

SPEC = """
[data]
{data}
[train]
epochs = 1
batch_size = 8
[[attack]]
id = "benign"
[grid]
model = ["deeplabv3_tiny"]
attack = ["benign"]
seed = {seeds}
"""
FIRST = "deeplabv3_tiny--benign--s0"
ADDED = "deeplabv3_tiny--benign--s1"


def write_spec(path: Path, data: str, seeds: str = "[0]") -> Path:
    path.write_text(SPEC.format(data=data, seeds=seeds))
    return path


def path_spec(path: Path, data_file: Path, seeds: str = "[0]") -> Path:
    return write_spec(path, f"path = {json.dumps(str(data_file))}", seeds)


def tiny_data(path: Path, seed: int = 0, compression: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_synth_dataset(path, n_train=16, n_test=8, size=32, seed=seed, compression=compression)


def build(spec: Path, zoo: Path) -> int:
    return main(["-q", "zoo", "build", str(spec), "--out", str(zoo), "--device", "cpu"])


def entry_files(zoo: Path, eid: str) -> dict[str, tuple[str, int]]:
    """Every file of a finished entry: its sha256 and mtime (a retrained or rescored entry changes both)."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted((zoo / "entries" / eid).iterdir()) if p.is_file()}


def snapshot(zoo: Path) -> dict[str, bytes]:
    return {name: (zoo / name).read_bytes() for name in ("plan.json", "manifest.json", "data/clean.json")}


def test_moved_data_file_resumes_and_grows_the_zoo(tmp_path, capsys):
    old = tiny_data(tmp_path / "data" / "camvid.h5")
    zoo = tmp_path / "zoo"
    assert build(path_spec(tmp_path / "zoo.toml", old), zoo) == 0
    before, trained = snapshot(zoo), entry_files(zoo, FIRST)
    assert json.loads(before["plan.json"])["data"] == {"path": str(old)}

    new = tmp_path / "camvid.h5"
    shutil.move(old, new)  # the same bytes, elsewhere; the old path is gone
    want = content_hash(new)
    assert json.loads(before["data/clean.json"])["content_hash"] == want
    capsys.readouterr()
    assert build(path_spec(tmp_path / "moved.toml", new), zoo) == 0
    out = capsys.readouterr().out
    moved = [line for line in out.splitlines() if line.startswith("data moved:")]
    assert moved == [f"data moved: {old} now at {new}, same content sha256 {want[:12]}; the zoo keeps recording {old}"]
    assert "1/1 entries already built; 0 to go" in out
    assert entry_files(zoo, FIRST) == trained  # nothing retrained or rewritten
    after = snapshot(zoo)
    assert after["plan.json"] == before["plan.json"] and after["data/clean.json"] == before["data/clean.json"]
    assert json.loads(after["manifest.json"])["data_source"] == {"path": str(old)}

    # growing the zoo from the moved file: the new entry trains on the zoo's own copy, the old one is untouched
    assert build(path_spec(tmp_path / "grown.toml", new, seeds="[0, 1]"), zoo) == 0
    plan = json.loads((zoo / "plan.json").read_text())
    assert plan["order"] == [FIRST, ADDED] and plan["data"] == {"path": str(old)}
    assert (zoo / "entries" / ADDED / "done.json").is_file()
    assert entry_files(zoo, FIRST) == trained
    manifest = json.loads((zoo / "manifest.json").read_text())
    assert manifest["complete"] and [e["id"] for e in manifest["entries"]] == [FIRST, ADDED]
    assert main(["zoo", "verify", str(zoo)]) == 0


def test_same_content_in_another_layout_is_accepted(tmp_path, capsys):
    """The zoo compares content hashes, not file bytes: a gzip-compressed rewrite of the same arrays is the same data."""
    old = tiny_data(tmp_path / "a" / "d.h5")
    zoo = tmp_path / "zoo"
    prepare(parse_spec(path_spec(tmp_path / "zoo.toml", old)), zoo, say=lambda m: None)
    new = tiny_data(tmp_path / "b" / "d.h5", compression="gzip")
    assert new.read_bytes() != old.read_bytes() and content_hash(new) == content_hash(old)
    said: list[str] = []
    plan = prepare(parse_spec(path_spec(tmp_path / "moved.toml", new)), zoo, say=said.append)
    assert plan["data"] == {"path": str(old)}
    assert said == [f"data moved: {old} now at {new}, same content sha256 {content_hash(new)[:12]}; "
                    f"the zoo keeps recording {old}"]


@pytest.fixture
def path_zoo(tmp_path) -> tuple[Path, Path]:
    """A zoo prepared (data and plan, no training) from a `[data] path`."""
    old = tiny_data(tmp_path / "a" / "d.h5")
    zoo = tmp_path / "zoo"
    prepare(parse_spec(path_spec(tmp_path / "zoo.toml", old)), zoo, say=lambda m: None)
    return zoo, old


def test_other_content_at_another_path_is_refused(path_zoo, tmp_path, capsys):
    zoo, old = path_zoo
    before = snapshot(zoo)
    other = tiny_data(tmp_path / "b" / "d.h5", seed=1)
    assert build(path_spec(tmp_path / "other.toml", other), zoo) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    recorded, found = content_hash(old)[:12], content_hash(other)[:12]
    assert recorded != found
    assert len(err.splitlines()) == 1 and "data moved" not in captured.out
    assert f"{old} (content sha256 {recorded})" in err and f"{other} has other content (content sha256 {found})" in err
    assert "use a new --out" in err
    assert snapshot(zoo) == before


def test_missing_data_file_keeps_its_spec_error(path_zoo, tmp_path, capsys):
    zoo, _ = path_zoo
    before = snapshot(zoo)
    assert build(path_spec(tmp_path / "gone.toml", tmp_path / "gone" / "d.h5"), zoo) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a readable file" in err
    assert snapshot(zoo) == before


def test_generated_data_with_another_definition_is_still_refused(tmp_path, capsys):
    zoo = tmp_path / "zoo"
    synth = "synth = {{ n_train = 16, n_test = 8, size = 32, seed = {} }}"
    prepare(parse_spec(write_spec(tmp_path / "zoo.toml", synth.format(0))), zoo, say=lambda m: None)
    before = snapshot(zoo)
    assert build(write_spec(tmp_path / "other.toml", synth.format(1)), zoo) == 2
    err = capsys.readouterr().err.strip()
    recorded = {"synth": {"n_train": 16, "n_test": 8, "size": 32, "seed": 0}}
    assert json.loads(before["plan.json"])["data"] == recorded
    assert err.endswith(f"{zoo} was built from other data ({json.dumps(recorded)}); use a new --out for this spec")
    assert len(err.splitlines()) == 1 and "content" not in err
    assert snapshot(zoo) == before
