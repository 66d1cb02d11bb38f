"""Zoo integrity end to end: tampering is refused by `zoo verify`, by `testbed.zoo.open` and by `bench --zoo`.

One tiny zoo (test_zoo's spec: benign + FGBA n-to-1, 48 images at 32², 1 epoch) is built once; every case tampers with a copy
the way the fault campaign did — a flipped byte, a re-seal (edit a file *and* the hash recorded for it, then
rebuild), a path leaving the zoo, a malformed manifest, unlisted files — and checks each consumer
independently: verify exits 1 naming the problem, the Python API raises a one-line ``UserError``, bench exits
2 with one line and writes nothing, a rebuild refuses to bless it, and no file of the zoo changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from testbed.cli import main
from testbed.core.errors import UserError

try:  # the module pytest collected (one TALLY for the whole campaign), not a second copy under tests.
    from test_faults import MARKER, TALLY, Boom, judge, run_main, snapshot
    from test_zoo import tiny_spec
except ImportError:
    from tests.test_faults import MARKER, TALLY, Boom, judge, run_main, snapshot
    from tests.test_zoo import tiny_spec

BENIGN, N1 = "deeplabv3_tiny--benign--s0", "deeplabv3_tiny--n1--s0"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from testbed.zoo.build import build

    root = tmp_path_factory.mktemp("integrity")
    spec = tiny_spec(root, epochs=1)  # benign + FGBA n-to-1 (line, 25%), 48 images at 32², deeplabv3_tiny
    result = build(spec, root / "zoo", device="cpu", progress=False, say=lambda m: None)
    assert result.ok
    return root


@pytest.fixture
def zoo(built, tmp_path) -> Path:
    shutil.copy(built / "zoo.toml", tmp_path / "zoo.toml")
    shutil.copytree(built / "zoo", tmp_path / "zoo", symlinks=True)
    return tmp_path / "zoo"


# -- tampering, done by hand (independently of the code under test) -------------------------------------
def canonical_checksum(m: dict) -> str:
    body = {k: v for k, v in m.items() if k != "checksum"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def manifest_edit(edit: Callable[[dict], None], reseal: bool = True) -> Callable[[Path], None]:
    """Edit manifest.json; with ``reseal``, recompute its checksum as a forger would."""
    def tamper(z: Path) -> None:
        m = json.loads((z / "manifest.json").read_text())
        edit(m)
        if reseal and isinstance(m, dict):
            m["checksum"] = canonical_checksum(m)
        (z / "manifest.json").write_text(json.dumps(m, indent=2))

    return tamper


def entry(m: dict, eid: str) -> dict:
    return next(e for e in m["entries"] if e["id"] == eid)


def poisoned(z: Path) -> Path:
    return next((z / "data").glob("poisoned-*.h5"))


def reseal_done(z: Path) -> None:
    """Flip the weights and record their new hash in done.json (the re-seal a rebuild used to bless)."""
    w = z / "entries" / N1 / "model.safetensors"
    flip(w)
    done = json.loads((z / "entries" / N1 / "done.json").read_text())
    done["files"]["model.safetensors"] = sha(w)
    (z / "entries" / N1 / "done.json").write_text(json.dumps(done))


def reseal_sidecar(z: Path) -> None:
    p = poisoned(z)
    flip(p)
    side = p.with_suffix(".json")
    rec = json.loads(side.read_text())
    rec["sha256"] = sha(p)
    side.write_text(json.dumps(rec, indent=2))


def symlinked_config(z: Path) -> None:
    target = z.parent / "elsewhere.json"
    shutil.copy(z / "entries" / N1 / "config.json", target)  # same bytes: only the link gives it away
    (z / "entries" / N1 / "config.json").unlink()
    os.symlink(target, z / "entries" / N1 / "config.json")


def symlinked_entry(z: Path) -> None:
    target = z.parent / "outside-entry"
    shutil.move(z / "entries" / N1, target)
    os.symlink(target, z / "entries" / N1)


def add_file(rel: str, data: bytes = b"x") -> Callable[[Path], None]:
    def tamper(z: Path) -> None:
        (z / rel).parent.mkdir(parents=True, exist_ok=True)
        (z / rel).write_bytes(data)

    return tamper


def dead_claim(z: Path) -> None:
    from testbed.core.procs import HOST

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (z / "entries" / f"{N1}.claim").write_text(json.dumps({"pid": p.pid, "host": HOST, "proc_start": None, "started": 0}))


def edit_json(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def tamper(z: Path) -> None:
        d = json.loads((z / rel).read_text())
        edit(d)
        (z / rel).write_text(json.dumps(d))

    return tamper


def _files(name: str, value) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        entry(m, N1)["files"][name] = value

    return edit


def swap_weights(z: Path) -> None:
    """Swap two entries' weights, write their new hashes into the manifest and recompute its checksum: the
    re-seal a forger without the publisher's key can do.  Only the entries' own done.json still disagree."""
    a, b = z / "entries" / N1 / "model.safetensors", z / "entries" / BENIGN / "model.safetensors"
    tmp = z.parent / "swap.tmp"
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)

    def edit(m: dict) -> None:
        for eid, w in ((N1, a), (BENIGN, b)):
            entry(m, eid)["files"][f"entries/{eid}/model.safetensors"] = sha(w)

    manifest_edit(edit)(z)


def swap_config(z: Path) -> None:
    """Give the backdoored entry the benign entry's config.json (a run claiming other data), manifest re-sealed."""
    shutil.copy(z / "entries" / BENIGN / "config.json", z / "entries" / N1 / "config.json")
    done = json.loads((z / "entries" / N1 / "done.json").read_text())
    done["files"]["config.json"] = sha(z / "entries" / N1 / "config.json")
    (z / "entries" / N1 / "done.json").write_text(json.dumps(done))

    def edit(m: dict) -> None:
        entry(m, N1)["files"][f"entries/{N1}/config.json"] = sha(z / "entries" / N1 / "config.json")
        entry(m, N1)["files"][f"entries/{N1}/done.json"] = sha(z / "entries" / N1 / "done.json")

    manifest_edit(edit)(z)


def swap_data_hash(z: Path) -> None:
    """Replace the poisoned dataset by the clean one and write its hash into the manifest (sidecar untouched)."""
    p = poisoned(z)
    shutil.copy(z / "data" / "clean.h5", p)
    name = p.stem
    manifest_edit(lambda m: m["datasets"][name].update(sha256=sha(p)))(z)


def linked_outside(rel: str, hard: bool) -> Callable[[Path], None]:
    """``rel`` replaced by a link to a byte-identical copy outside the zoo (only the link gives it away)."""
    def tamper(z: Path) -> None:
        target = z.parent / ("outside-" + rel.replace("/", "_"))
        shutil.copy(z / rel, target)
        (z / rel).unlink()
        (os.link if hard else os.symlink)(target, z / rel)

    return tamper


# (id, tamper, needle in verify's output, needle of the API's / bench's error or None when they do not read it)
TAMPER = [
    # flips
    ("flip-weights", lambda z: flip(z / "entries" / N1 / "model.safetensors"),
     f"entries/{N1}/model.safetensors: sha256 mismatch", "model.safetensors: sha256 mismatch"),
    ("flip-config", lambda z: flip(z / "entries" / BENIGN / "config.json"), "config.json: sha256 mismatch",
     "config.json: sha256 mismatch"),
    ("flip-clean-data", lambda z: flip(z / "data" / "clean.h5"), "data/clean.h5: sha256 mismatch",
     "data/clean.h5: sha256 mismatch"),
    ("flip-poisoned-data", lambda z: flip(poisoned(z)), ": sha256 mismatch", ".h5: sha256 mismatch"),
    ("delete-weights", lambda z: (z / "entries" / N1 / "model.safetensors").unlink(), "model.safetensors: missing",
     "model.safetensors: missing"),
    # re-seals (a rebuild must not bless them either: test_rebuild_refuses_to_bless)
    ("reseal-done-json", reseal_done, "model.safetensors: sha256 mismatch", "sha256 mismatch"),
    ("reseal-sidecar", reseal_sidecar, ": sha256 mismatch", ": sha256 mismatch"),  # the sidecar's own hash, first
    # paths leaving the zoo (re-sealed manifests, so only the path gives them away)
    ("escape-dotdot", manifest_edit(_files("../../../../etc/passwd", "0" * 64)), "malformed", "malformed"),
    ("escape-absolute", manifest_edit(_files("/etc/passwd", "0" * 64)), "malformed", "malformed"),
    ("escape-dataset-file", manifest_edit(lambda m: m["datasets"]["clean"].update(file="../clean.h5")), "malformed",
     "malformed"),
    ("escape-run-dir", manifest_edit(lambda m: entry(m, N1).update(run_dir="../outside")), "malformed", "malformed"),
    ("symlinked-file", symlinked_config, "symbolic link", "symbolic link"),
    ("symlinked-entry-dir", symlinked_entry, "symbolic link", "symbolic link"),
    # malformed manifests
    ("datasets-a-list", manifest_edit(lambda m: m.update(datasets=[])), "malformed", "malformed"),
    ("entries-an-object", manifest_edit(lambda m: m.update(entries={})), "malformed", "malformed"),
    ("entry-without-files", manifest_edit(lambda m: entry(m, N1).pop("files")), "malformed", "malformed"),
    ("entry-seed-a-string", manifest_edit(lambda m: entry(m, N1).update(seed="0")), "malformed", "malformed"),
    ("entry-missing-id", manifest_edit(lambda m: entry(m, N1).pop("id")), "malformed", "malformed"),
    ("manifest-a-list", lambda z: (z / "manifest.json").write_text("[]"), "malformed", "malformed"),
    ("manifest-not-json", lambda z: (z / "manifest.json").write_text("{"), "not valid JSON", "not valid JSON"),
    ("manifest-other-format", manifest_edit(lambda m: m.update(format="other")), "malformed", "malformed"),
    ("manifest-edited", manifest_edit(lambda m: entry(m, N1)["metrics"].update(ASR=-1.0), reseal=False), "tampered",
     "checksum"),
    # verify's former blind spots (the API does not read these files)
    ("plan-edited", edit_json("plan.json", lambda p: p["entries"][BENIGN].update(reference={"n1": "clean"})),
     "plan.json: sha256 mismatch", None),
    ("sidecar-edited", edit_json("data/clean.json", lambda r: r.update(built="yesterday")),
     "data/clean.json: sha256 mismatch", None),
    ("hidden-file", add_file(f"entries/{N1}/.evil"), f"entries/{N1}/.evil: not listed", None),
    ("root-file", add_file("README.txt"), "README.txt: not listed", None),
    ("data-file", add_file("data/extra.h5"), "data/extra.h5: not listed", None),
    ("leftover-claim", dead_claim, f"entries/{N1}.claim: a builder's claim", None),
    ("unexpected-dir", add_file("entries/other/x.bin"), "entries/other/: a directory not listed", None),
    # issue 23: swapped files under a re-sealed manifest, links to outside the zoo
    ("swap-weights-resealed", swap_weights, f"entries/{N1}/model.safetensors: the manifest's sha256 differs from the "
     "one done.json recorded", "done.json recorded"),
    ("swap-config-resealed", swap_config, f"entries/{N1}/config.json: trained on other data", "trained on other data"),
    ("swap-data-resealed", swap_data_hash, "differs from the manifest's", "differs from the manifest's"),
    ("symlinked-manifest", linked_outside("manifest.json", hard=False), "manifest.json: a symbolic link",
     "manifest.json: a symbolic link"),
    ("symlinked-plan", linked_outside("plan.json", hard=False), "plan.json: a symbolic link", "plan.json: a symbolic link"),
    ("hardlinked-weights", linked_outside(f"entries/{N1}/model.safetensors", hard=True),
     f"entries/{N1}/model.safetensors: a hard link", "model.safetensors: a hard link"),
    ("hardlinked-manifest", linked_outside("manifest.json", hard=True), "manifest.json: a hard link",
     "manifest.json: a hard link"),
    ("manifest-deeply-nested", lambda z: (z / "manifest.json").write_text("[" * 100000 + "]" * 100000),
     "manifest.json: not valid JSON (nested", "nested"),
    ("plan-deeply-nested", lambda z: (z / "plan.json").write_text("[" * 100000 + "]" * 100000),
     "plan.json: sha256 mismatch", "plan.json: sha256 mismatch"),
]


@pytest.mark.parametrize("case", TAMPER, ids=[t[0] for t in TAMPER])
def test_verify_reports_tampering_without_a_traceback(case, zoo: Path, capsys):
    _, tamper, needle, _ = case
    tamper(zoo)
    before = snapshot(zoo.parent)
    capsys.readouterr()
    rc = main(["zoo", "verify", str(zoo)])
    out, err = capsys.readouterr()
    TALLY["tried"] += 1
    TALLY["clean_errors"] += rc == 1 and not err
    assert rc == 1 and not err, (rc, out, err)
    assert needle in out, (needle, out)
    assert all(line.startswith(("FAIL ", "zoo ")) for line in out.splitlines()), out
    assert snapshot(zoo.parent) == before


API_CASES = [t for t in TAMPER if t[3] is not None]


@pytest.mark.parametrize("case", API_CASES, ids=[t[0] for t in API_CASES])
def test_python_api_refuses_tampering(case, zoo: Path):
    import testbed.zoo

    _, tamper, _, needle = case
    tamper(zoo)
    with pytest.raises(UserError) as info:
        z = testbed.zoo.open(zoo)
        for e in z:
            e.load_model("cpu")
    TALLY["tried"] += 1
    TALLY["clean_errors"] += "\n" not in str(info.value)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("case", API_CASES, ids=[t[0] for t in API_CASES])
def test_bench_refuses_tampering(case, zoo: Path, capsys):
    _, tamper, _, needle = case
    tamper(zoo)
    before = snapshot(zoo.parent)
    outcome = run_main(["bench", "--zoo", str(zoo), "--defense", "strip", "--device", "cpu", "--out",
                        str(zoo.parent / "rep")], capsys)
    judge(before, snapshot(zoo.parent), outcome, 2, needle)


@pytest.mark.parametrize("case", ["reseal-done-json", "reseal-sidecar", "flip-weights", "manifest-edited",
                                  "datasets-a-list", "swap-weights-resealed", "manifest-deeply-nested",
                                  "plan-deeply-nested"])
def test_rebuild_refuses_to_bless_tampering(case, zoo: Path, capsys):
    tamper = next(t[1] for t in TAMPER if t[0] == case)
    tamper(zoo)
    before = snapshot(zoo.parent)
    outcome = run_main(["zoo", "build", str(zoo.parent / "zoo.toml"), "--out", str(zoo), "--device", "cpu"],
                       capsys)
    judge(before, snapshot(zoo.parent), outcome, 2, "zoo verify")
    assert main(["zoo", "verify", str(zoo)]) == 1


def test_rebuild_of_an_intact_zoo_cleans_up_and_a_deleted_entry_is_rebuilt(zoo: Path, capsys):
    """A rebuild adopts what matches: a stale claim left after done.json goes, a deleted entry is retrained."""
    dead_claim(zoo)
    assert main(["zoo", "verify", str(zoo)]) == 1
    spec = str(zoo.parent / "zoo.toml")
    assert main(["-q", "zoo", "build", spec, "--out", str(zoo), "--device", "cpu"]) == 0
    assert not (zoo / "entries" / f"{N1}.claim").exists()
    capsys.readouterr()
    assert main(["zoo", "verify", str(zoo)]) == 0, capsys.readouterr().out
    old = sha(zoo / "entries" / N1 / "model.safetensors")
    shutil.rmtree(zoo / "entries" / BENIGN)
    assert main(["-q", "zoo", "build", spec, "--out", str(zoo), "--device", "cpu"]) == 0
    assert main(["zoo", "verify", str(zoo)]) == 0
    assert (zoo / "entries" / BENIGN / "done.json").is_file()
    assert sha(zoo / "entries" / N1 / "model.safetensors") == old  # the other entry was left alone


def forge_pickle_weights(zoo: Path, marker: Path) -> None:
    """A forger replaces the weights with a pickle and re-seals everything (done.json, manifest)."""
    import pickle

    w = zoo / "entries" / N1 / "model.safetensors"
    w.write_bytes(pickle.dumps(Boom(marker)))
    edit_json(f"entries/{N1}/done.json", lambda d: d["files"].update({"model.safetensors": sha(w)}))(zoo)
    done_sha = sha(zoo / "entries" / N1 / "done.json")
    manifest_edit(lambda m: entry(m, N1)["files"].update({f"entries/{N1}/model.safetensors": sha(w),
                                                          f"entries/{N1}/done.json": done_sha}))(zoo)


def test_forged_pickle_weights_are_refused_and_never_run(zoo: Path, capsys):
    """Verify cannot tell a complete forgery (the checksum is not a signature), but loading refuses the pickle
    — through the API and through bench — and runs no code."""
    import testbed.zoo

    marker = zoo.parent / MARKER
    forge_pickle_weights(zoo, marker)
    assert main(["zoo", "verify", str(zoo)]) == 0  # a complete forgery verifies: publish the manifest's sha256
    with pytest.raises(UserError, match="pickle"):
        testbed.zoo.open(zoo).entry(N1).load_model()
    outcome = run_main(["bench", "--zoo", str(zoo), "--entries", N1, "--defense", "strip", "--device", "cpu",
                        "--out", str(zoo.parent / "rep")], capsys)
    TALLY["tried"] += 1
    TALLY["code_executed"] += marker.exists()
    assert not marker.exists()
    assert outcome.rc == 2 and "pickle" in outcome.err and outcome.crashed is None, outcome
    TALLY["clean_errors"] += 1


def test_bench_that_fails_on_a_model_leaves_no_output(zoo: Path, capsys):
    forge_pickle_weights(zoo, zoo.parent / MARKER)
    before = snapshot(zoo.parent)
    outcome = run_main(["bench", "--zoo", str(zoo), "--entries", N1, "--defense", "strip", "--device", "cpu",
                        "--out", str(zoo.parent / "rep")], capsys)
    assert outcome.rc == 2 and sorted(set(snapshot(zoo.parent)) - set(before)) == []


@pytest.mark.parametrize("case,tamper,needle", [
    ("unknown-id-in-order", edit_json("plan.json", lambda p: p["order"].append("ghost")), "'ghost'"),
    ("plan-not-json", lambda z: (z / "plan.json").write_text("{"), "plan.json"),
    ("plan-entries-a-list", edit_json("plan.json", lambda p: p.update(entries=[])), "plan.json is malformed"),
    ("done-json-a-list", lambda z: (z / "entries" / N1 / "done.json").write_text("[]"), "done.json is malformed"),
])
def test_zoo_ls_on_damaged_records_is_one_line(case, tamper, needle, zoo: Path, capsys):
    tamper(zoo)
    before = snapshot(zoo.parent)
    outcome = run_main(["zoo", "ls", str(zoo)], capsys)
    judge(before, snapshot(zoo.parent), outcome, 2, needle)


def test_entries_are_hashed_once_per_process(zoo: Path, monkeypatch):
    """Verification is cached by file identity: a second open hashes nothing, a changed file is hashed again."""
    import testbed.zoo
    from testbed.zoo import integrity

    calls: list[str] = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda p: calls.append(Path(p).name) or real(p))
    list(testbed.zoo.open(zoo))
    first = len(calls)
    assert first >= 6  # weights, configs, logs, metrics, datasets ... (once each)
    list(testbed.zoo.open(zoo))
    assert len(calls) == first
    flip(zoo / "entries" / N1 / "model.safetensors")
    with pytest.raises(UserError, match="model.safetensors: sha256 mismatch"):
        testbed.zoo.open(zoo).entry(N1)
    assert calls[first:] == ["model.safetensors"]


def test_manifest_covers_records_and_reference_data(built):
    """The manifest hashes plan.json and every dataset record, and names a benign entry's reference datasets."""
    z = built / "zoo"
    m = json.loads((z / "manifest.json").read_text())
    assert m["version"] == 2 and m["checksum"] == canonical_checksum(m)
    assert m["records"] == {"plan.json": sha(z / "plan.json"),
                            **{f"data/{p.stem}.json": sha(p) for p in (z / "data").glob("*.json")}}
    benign = entry(m, BENIGN)
    plan = json.loads((z / "plan.json").read_text())
    assert benign["reference_data"] == plan["entries"][BENIGN]["reference"] == {"n1": poisoned(z).stem}
    import testbed.zoo

    assert testbed.zoo.open(z).entry(BENIGN).reference_data == {"n1": poisoned(z)}


def test_unresumable_entry_names_the_zoo_fix_not_a_train_flag(zoo: Path, capsys):
    """A damaged checkpoint of an unfinished entry: the build reports it (exit 1) with advice that applies to a
    zoo — delete the checkpoint — not the trainer's `--overwrite`."""
    (zoo / "entries" / N1 / "done.json").unlink()
    (zoo / "entries" / N1 / "checkpoint.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    rc = main(["-q", "zoo", "build", str(zoo.parent / "zoo.toml"), "--out", str(zoo), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err, (out, err)
    assert f"entry {N1} cannot resume" in out and "checkpoint.pt to train it from the start" in out, out
    assert "--overwrite" not in out + err


def test_suites_refuse_a_tampered_zoo_as_a_usage_error(zoo: Path, tmp_path):
    flip(zoo / "entries" / N1 / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "testbed.suites", "--defense", "strip", "--zoo",
                           str(zoo), "-q", "-p", "no:cacheprovider"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4 and "sha256 mismatch" in out and "Traceback" not in out, out[-2000:]


def test_a_version_1_manifest_is_refreshed_by_a_rebuild_without_retraining(zoo: Path, capsys):
    """Zoos built before the manifest hashed its records (version 1) are refused by the API with the fix, and
    `testbed zoo build` with the same spec writes a version-2 manifest without training anything."""
    import testbed.zoo

    def to_v1(m: dict) -> None:
        m["version"] = 1
        m.pop("records")
        for e in m["entries"]:
            e.pop("reference_data", None)

    manifest_edit(to_v1)(zoo)
    weights = {p: sha(p) for p in zoo.glob("entries/*/model.safetensors")}
    with pytest.raises(UserError, match="version-1 manifest"):
        testbed.zoo.open(zoo)
    assert main(["zoo", "verify", str(zoo)]) == 1
    assert "version 1" in capsys.readouterr().out
    assert main(["-q", "zoo", "build", str(zoo.parent / "zoo.toml"), "--out", str(zoo), "--device", "cpu"]) == 0
    assert "2/2 entries already built" in capsys.readouterr().out
    assert main(["zoo", "verify", str(zoo)]) == 0
    assert {p: sha(p) for p in zoo.glob("entries/*/model.safetensors")} == weights
    assert len(testbed.zoo.open(zoo)) == 2


# -- signed zoos (issue 23): a re-seal without the publisher's key fails verification against it ----------------
def _key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = directory / f"{name}.pem", directory / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture
def signed(zoo: Path, capsys) -> tuple[Path, Path, Path]:
    """The zoo signed by a publisher; returns (zoo, publisher's public key, a stranger's private key)."""
    pytest.importorskip("model_signing")
    keys = zoo.parent / "keys"
    keys.mkdir()
    priv, pub = _key_pair(keys, "publisher")
    other, _ = _key_pair(keys, "stranger")
    assert main(["zoo", "sign", str(zoo), "--private-key", str(priv)]) == 0
    assert (zoo / "manifest.sig").is_file()
    capsys.readouterr()
    return zoo, pub, other


def test_a_signed_zoo_verifies_with_its_key_and_is_used(signed, capsys):
    import testbed.zoo

    zoo, pub, _ = signed
    for flag in ("--public-key", "--trusted-key"):
        assert main(["zoo", "verify", str(zoo), flag, str(pub)]) == 0
        assert "signed by the --public-key" in capsys.readouterr().out
    assert len(testbed.zoo.open(zoo, public_key=pub)) == 2


RESIGN = [("reseal-swap", swap_weights, None), ("reseal-swap-signed-by-stranger", swap_weights, "stranger"),
          ("manifest-edited-resealed", manifest_edit(lambda m: entry(m, N1)["metrics"].update(ASR=99.0)), None),
          ("signature-removed", lambda z: (z / "manifest.sig").unlink(), None),
          ("signature-garbage", lambda z: (z / "manifest.sig").write_text("[" * 100000), None)]


@pytest.mark.parametrize("case", RESIGN, ids=[c[0] for c in RESIGN])
def test_a_resealed_zoo_fails_against_the_publishers_key(case, signed, capsys):
    import testbed.zoo

    zoo, pub, stranger = signed
    _, tamper, resign = case
    tamper(zoo)
    if resign:  # the forger re-seals and signs with their own key: still not the publisher's signature
        from testbed.zoo.signing import sign

        sign(zoo, stranger)  # through the library: `testbed zoo sign` itself refuses a zoo that does not verify
    before = snapshot(zoo.parent)
    capsys.readouterr()
    rc = main(["zoo", "verify", str(zoo), "--trusted-key", str(pub)])
    out, err = capsys.readouterr()
    TALLY["tried"] += 1
    TALLY["clean_errors"] += rc == 1 and not err
    assert rc == 1 and not err and "FAIL manifest.sig" in out, (rc, out, err)
    with pytest.raises(UserError, match="manifest.sig") as info:
        testbed.zoo.open(zoo, public_key=pub)
    assert "\n" not in str(info.value)
    outcome = run_main(["bench", "--zoo", str(zoo), "--public-key", str(pub), "--defense", "strip", "--device", "cpu",
                        "--out", str(zoo.parent / "rep")], capsys)
    judge(before, snapshot(zoo.parent), outcome, 2, "manifest.sig")


def test_signing_refuses_an_unverified_zoo_and_bad_keys(zoo: Path, capsys):
    pytest.importorskip("model_signing")
    priv, pub = _key_pair(zoo.parent, "k")
    flip(zoo / "entries" / N1 / "model.safetensors")
    for argv, needle in ((["zoo", "sign", str(zoo), "--private-key", str(priv)], "does not verify"),
                         (["zoo", "sign", str(zoo), "--private-key", str(pub)], "cannot sign with it"),
                         (["zoo", "sign", str(zoo), "--private-key", str(zoo.parent / "none.pem")], "no such file"),
                         (["zoo", "verify", str(zoo), "--public-key", str(zoo.parent / "none.pub")], "no such file")):
        if needle == "cannot sign with it":
            flip(zoo / "entries" / N1 / "model.safetensors")  # restore: only the key is wrong now
        before = snapshot(zoo.parent)
        judge(before, snapshot(zoo.parent), run_main(argv, capsys), 2, needle)
        if needle == "cannot sign with it":
            flip(zoo / "entries" / N1 / "model.safetensors")


def test_suites_refuse_an_unsigned_zoo_given_a_public_key(zoo: Path, tmp_path):
    pytest.importorskip("model_signing")
    _, pub = _key_pair(tmp_path, "publisher")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "testbed.suites", "--defense", "strip", "--zoo",
                           str(zoo), "--public-key", str(pub), "-q", "-p", "no:cacheprovider"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # this checkout
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4 and "the zoo is not signed" in out and "Traceback" not in out, out[-2000:]


# -- does a rebuild reproduce a published zoo? (`zoo verify --against`) --------------------------------------
@pytest.fixture(scope="module")
def rebuilt(built) -> Path:
    """The same spec built a second time into another directory: a third party reproducing the zoo."""
    from testbed.zoo.build import build

    result = build(built / "zoo.toml", built / "rebuild", device="cpu", progress=False, say=lambda m: None)
    assert result.ok
    return built / "rebuild"


def published_copy(built: Path, tmp_path: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """The first zoo's manifest.json alone (no weights), as a publisher ships it; ``edit`` then reseals it."""
    m = json.loads((built / "zoo" / "manifest.json").read_text())
    if edit is not None:
        edit(m)
        m["checksum"] = canonical_checksum(m)
    out = tmp_path / "published" / "manifest.json"
    out.parent.mkdir()
    out.write_text(json.dumps(m, indent=1))
    return out


def verdicts(out: str) -> dict[str, str]:
    return {line.split()[1].rstrip(":"): line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0] in ("SAME", "MISMATCH", "DIFFERS", "OTHER")}


def test_rebuild_reproduces_the_published_zoo_byte_for_byte(built, rebuilt, tmp_path, capsys):
    """Same spec, same machine and thread count: every entry SAME, exactly when the weights' bytes are equal."""
    for eid in (BENIGN, N1):  # the expectation, from the files themselves
        assert sha(rebuilt / "entries" / eid / "model.safetensors") == sha(built / "zoo" / "entries" / eid / "model.safetensors")
    capsys.readouterr()
    assert main(["zoo", "verify", str(rebuilt), "--against", str(published_copy(built, tmp_path))]) == 0
    out = capsys.readouterr().out
    assert verdicts(out) == {BENIGN: "SAME", N1: "SAME"}
    assert ("2 entries compared: 2 byte-identical, 0 byte-identical with other published scores, 0 with other weights, "
            "0 a different experiment") in out


def _other_weights(m: dict) -> None:
    e = entry(m, N1)
    e["files"][f"{e['run_dir']}/model.safetensors"] = "0" * 64
    e["metrics"]["ASR"] -= 2.5
    e["metrics"]["mIoU-B"] += 1.25


def test_other_weights_differ_with_score_differences(built, rebuilt, tmp_path, capsys):
    """Published weights of another machine: DIFFERS, with this zoo's scores minus the published ones; exit 1."""
    capsys.readouterr()
    assert main(["zoo", "verify", str(rebuilt), "--against", str(published_copy(built, tmp_path, _other_weights))]) == 1
    out = capsys.readouterr().out
    assert verdicts(out) == {BENIGN: "SAME", N1: "DIFFERS"}
    line = next(x for x in out.splitlines() if x.startswith("DIFFERS"))
    assert "ASR +2.50" in line and "mIoU-B -1.25" in line


def _other_epochs(m: dict) -> None:
    entry(m, BENIGN)["config"]["epochs"] += 10


def _other_data(m: dict) -> None:
    name = entry(m, N1)["dataset"]
    m["datasets"][name]["content_hash"] = "f" * 64


@pytest.mark.parametrize("edit, eid, needle", [(_other_epochs, BENIGN, "config.epochs"), (_other_data, N1, "data: ")])
def test_another_experiment_is_named_not_compared(built, rebuilt, tmp_path, capsys, edit, eid, needle):
    """Other training settings or other data: OTHER, naming the first difference, never SAME by weights."""
    capsys.readouterr()
    assert main(["zoo", "verify", str(rebuilt), "--against", str(published_copy(built, tmp_path, edit))]) == 1
    out = capsys.readouterr().out
    assert verdicts(out)[eid] == "OTHER"
    assert needle in next(x for x in out.splitlines() if x.startswith(f"OTHER   {eid}"))


def test_identical_weights_with_other_published_scores_are_a_mismatch(built, rebuilt, tmp_path, capsys):
    """A published manifest whose scores were edited (and resealed): the weights match, the scores do not; exit 1."""
    def edit(m: dict) -> None:
        entry(m, N1)["metrics"]["ASR"] -= 0.5

    capsys.readouterr()
    assert main(["zoo", "verify", str(rebuilt), "--against", str(published_copy(built, tmp_path, edit))]) == 1
    out = capsys.readouterr().out
    assert verdicts(out) == {BENIGN: "SAME", N1: "MISMATCH"} and "ASR +0.5000" in out


def test_a_partial_spec_reproduces_its_benign_entry(built, tmp_path, capsys):
    """A spec with part of the grid (benign only): its benign entry has no reference set for the attack it lacks,
    and is still SAME (reference sets are compared for the attacks both zoos hold)."""
    from testbed.zoo.build import build

    spec = tiny_spec(built, epochs=1, attacks='["benign"]', name="benign-only.toml")
    assert build(spec, tmp_path / "part", device="cpu", progress=False, say=lambda m: None).ok
    capsys.readouterr()
    assert main(["zoo", "verify", str(tmp_path / "part"), "--against", str(built / "zoo")]) == 0
    out = capsys.readouterr().out
    assert verdicts(out) == {BENIGN: "SAME"} and "0 only here, 1 only published" in out


def test_nothing_compared_says_so_and_exits_1(built, rebuilt, tmp_path, capsys):
    def other_ids(m: dict) -> None:  # a publisher's zoo with none of these entries
        m["entries"] = []

    capsys.readouterr()
    assert main(["zoo", "verify", str(rebuilt), "--against", str(published_copy(built, tmp_path, other_ids))]) == 1
    out = capsys.readouterr().out
    assert "nothing compared" in out and "0 entries compared" in out


def test_entries_only_one_side_holds_are_counted(built, rebuilt, tmp_path, capsys):
    """A partial rebuild is compared on what it holds; the rest is counted as only published."""
    def drop_benign(m: dict) -> None:
        m["entries"] = [e for e in m["entries"] if e["id"] != BENIGN]

    capsys.readouterr()
    assert main(["zoo", "verify", str(rebuilt), "--against", str(published_copy(built, tmp_path, drop_benign))]) == 0
    out = capsys.readouterr().out
    assert verdicts(out) == {N1: "SAME"} and "1 only here, 0 only published" in out


def _config_not_object(m: dict) -> None:
    entry(m, N1)["config"] = ["x"]


def _reference_not_map(m: dict) -> None:
    entry(m, BENIGN)["reference_data"] = {"n1": ["a"]}


def _no_content_hash(m: dict) -> None:
    for d in m["datasets"].values():
        d.pop("content_hash", None)


@pytest.mark.parametrize("bad, needle", [("tampered", "checksum does not match"), ("missing", "no such file"),
                                          ("not-json", "not valid JSON"), ("not-a-manifest", "not a zoo manifest"),
                                          (_config_not_object, "'config' is not an object"),
                                          (_reference_not_map, "not a zoo manifest"),
                                          (_no_content_hash, "has no content_hash")])
def test_a_bad_published_manifest_is_one_line_and_exit_2(built, rebuilt, tmp_path, capsys, bad, needle):
    """Bad or schema-valid-but-incomparable published manifests: one line, exit 2, nothing printed on stdout."""
    path = published_copy(built, tmp_path, bad if callable(bad) else None)
    if bad == "tampered":
        path.write_text(path.read_text().replace('"seed": 0', '"seed": 7', 1))
    elif bad == "missing":
        path.unlink()
    elif bad == "not-json":
        path.write_text("{")
    elif bad == "not-a-manifest":
        path.write_text(json.dumps({"format": "something else"}))
    capsys.readouterr()
    try:
        rc = main(["zoo", "verify", str(rebuilt), "--against", str(path)])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
