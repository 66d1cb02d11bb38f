"""Fault suite III (issue 23's last items): a run config edited to claim other training data, Ctrl-C to a
`zoo build --workers 2` while its workers train.

Judged as in tests/test_faults.py (exit code, one line on stderr, no traceback, nothing new or changed);
two more columns are counted here: ``tamper_unnoticed`` (an edit the command did not refuse) and ``hangs``
(a command that did not end within its bound).  Every case is a few seconds of CPU but the Ctrl-C one,
which trains a two-entry zoo (32×32, 2 epochs), interrupted and resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file, save_file

try:  # the module pytest collected (one TALLY for the whole campaign), not a second copy under tests.
    from test_faults import MARKER, TALLY, base, judge, run_main, snapshot, ws  # noqa: F401
    from test_zoo import REPO, tiny_spec, zoo_log
except ImportError:
    from tests.test_faults import MARKER, TALLY, base, judge, run_main, snapshot, ws  # noqa: F401
    from tests.test_zoo import REPO, tiny_spec, zoo_log

TALLY.setdefault("tamper_unnoticed", 0)
TALLY.setdefault("hangs", 0)


# -- a run's config.json edited to claim other training data ----------------------------------------------
def _edit_config(change: Callable[[dict, Path], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        cfg = json.loads((ws / "R" / "config.json").read_text())
        change(cfg["dataset"], ws)
        (ws / "R" / "config.json").write_text(json.dumps(cfg, indent=2))

    return setup


def _claim_poisoned(ds: dict, ws: Path) -> None:
    """Claim the run was trained on p.h5: its path, its content hash (recomputed here) and its attack record."""
    from testbed.data.h5data import content_hash, open_dataset

    with open_dataset(ws / "p.h5", check_labels=False) as f:
        ds.update(path=str(ws / "p.h5"), content_hash=content_hash(f.file), attack=f.attack)


def _claim_attack_only(ds: dict, ws: Path) -> None:
    ds["attack"] = {"name": "fgba", "label": "fgba-n-to-1", "params": {"preset": "n-to-1"}}


def _claim_benign(ds: dict, ws: Path) -> None:
    ds["content_hash"] = "0" * 64


def _damage_record(ws: Path) -> None:
    weights = ws / "R" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "dataset": "{not json"})


@dataclass
class Edit:
    name: str
    argv: list[str]
    needle: str
    setup: Callable[[Path], None]


SCORE_P = ["score", "{ws}/R", "--data", "{ws}/p.h5", "--device", "cpu"]
SCORE_D = ["score", "{ws}/R", "--data", "{ws}/d.h5", "--device", "cpu"]
BENCH_P = ["bench", "--run", "{ws}/R", "--data", "{ws}/p.h5", "--defense", "strip", "--device", "cpu", "--out", "{ws}/B"]
DEFEND_P = ["defend", "{ws}/R", "--data", "{ws}/p.h5", "--defense", "strip", "--device", "cpu", "--out", "{ws}/B"]
MISMATCH = "config.json does not match its weights"
EDITS = [
    Edit("score-claims-the-poisoned-file", SCORE_P, MISMATCH, _edit_config(_claim_poisoned)),
    Edit("score-claims-an-attack", SCORE_D, MISMATCH, _edit_config(_claim_attack_only)),
    Edit("score-claims-another-hash", SCORE_D, MISMATCH, _edit_config(_claim_benign)),
    Edit("bench-claims-the-poisoned-file", BENCH_P, MISMATCH, _edit_config(_claim_poisoned)),
    Edit("defend-claims-the-poisoned-file", DEFEND_P, MISMATCH, _edit_config(_claim_poisoned)),
    Edit("score-damaged-weights-record", SCORE_D, "record of the training data is damaged", _damage_record),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in EDITS])
def test_a_config_edited_to_claim_other_data_is_refused(case: Edit, ws: Path, capsys):
    case.setup(ws)
    before = snapshot(ws)
    outcome = run_main([a.replace("{ws}", str(ws)) for a in case.argv], capsys)
    TALLY["tamper_unnoticed"] += outcome.rc == 0
    judge(before, snapshot(ws), outcome, 2, case.needle, ws / MARKER)


def test_the_weights_record_the_training_data_and_an_honest_run_scores(ws: Path, capsys):
    from safetensors import safe_open

    from testbed.data.h5data import content_hash

    with safe_open(str(ws / "R" / "model.safetensors"), framework="pt") as f:
        record = json.loads(f.metadata()["dataset"])
    assert record["content_hash"] == content_hash(ws / "d.h5")  # computed here from the file itself
    dataset = json.loads((ws / "R" / "config.json").read_text())["dataset"]
    # by content, not by place: the path stays in config.json only, so the same training elsewhere gives the same bytes
    assert "path" not in record and record == {k: v for k, v in dataset.items() if k != "path"}
    outcome = run_main(SCORE_P[:1] + [str(ws / "R"), "--data", str(ws / "p.h5"), "--device", "cpu"], capsys)
    assert outcome.rc == 0 and outcome.crashed is None, outcome
    assert "trained on" in outcome.err and "rows are labelled" not in outcome.err  # plain wording, not bench's


def test_a_run_saved_without_the_record_still_scores(ws: Path, capsys):
    """Runs saved before the record existed (or weights re-saved by other tools) are not refused."""
    weights = ws / "R" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    outcome = run_main(SCORE_D[:1] + [str(ws / "R"), "--data", str(ws / "d.h5"), "--device", "cpu"], capsys)
    assert outcome.rc == 0 and outcome.crashed is None, outcome


# -- Ctrl-C while the workers of `zoo build --workers 2` train ---------------------------------------
def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def _build(spec: Path, zoo: Path) -> subprocess.Popen:
    """A builder in its own process group, as a terminal runs it (Ctrl-C reaches the group: builder and workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "testbed.cli", "zoo", "build", str(spec), "--out", str(zoo),
                             "--device", "cpu", "--workers", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """Ctrl-C as in a terminal: a test run started in the background inherits SIGINT ignored (POSIX), and Python
    only turns SIGINT into KeyboardInterrupt where it was not ignored at startup."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def interrupted_zoo(tmp_path_factory):
    """SIGINT to the builder's process group once an entry has checkpointed an epoch; then the same command again."""
    tmp = tmp_path_factory.mktemp("zoo-ctrl-c")
    spec, zoo = tiny_spec(tmp, epochs=2), tmp / "zoo"
    proc = _build(spec, zoo)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not list(zoo.glob("entries/*/train_log.jsonl")):
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    logs = {p.parent.name: p.read_text().splitlines() for p in zoo.glob("entries/*/train_log.jsonl")}
    workers = [r["pid"] for eid in (p.name for p in zoo.glob("entries/*") if p.is_dir()) for r in zoo_log(zoo, eid)]
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    try:
        out, err = proc.communicate(timeout=60)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        hung = True
    state = {"rc": proc.returncode, "out": out, "err": err, "hung": hung, "seconds": time.time() - t0, "logs": logs,
             "workers": workers, "workers_alive": [w for w in workers if _alive(w)], "tree": _tree(zoo)}
    state["ls"], state["verify"] = (_cli("zoo", "ls", str(zoo), "--json"), _cli("zoo", "verify", str(zoo)))
    rerun = _build(spec, zoo)
    state["rerun_out"], state["rerun_err"] = rerun.communicate(timeout=400)
    state["rerun_rc"] = rerun.returncode
    return zoo, state


def test_ctrl_c_to_a_zoo_build_with_workers_is_one_line_130_and_resumes(interrupted_zoo, capsys):
    from testbed.cli import main

    zoo, s = interrupted_zoo
    TALLY["tried"] += 1
    TALLY["hangs"] += s["hung"]
    lines = [line for line in s["err"].splitlines() if line.strip()]
    traceback = "Traceback" in s["err"] or "KeyboardInterrupt" in s["err"]
    TALLY["tracebacks"] += traceback
    TALLY["partial_files"] += any(".tmp" in k for k in s["tree"])
    assert not s["hung"], "the builder did not end within 60 s of Ctrl-C"
    assert not traceback, s["err"]
    assert s["rc"] == 130, (s["rc"], s["err"])
    assert lines == ["testbed: interrupted; run the same command again to resume (finished entries and epochs are kept)"], s["err"]
    assert not s["workers_alive"], "worker processes outlived the builder"
    assert not any(".tmp" in k for k in s["tree"]), "a temporary file was left behind"
    # nothing lost: every epoch checkpointed before the interrupt is kept and the rerun goes on from it
    assert s["rerun_rc"] == 0, s["rerun_err"]
    resumed = 0
    for eid, before in s["logs"].items():
        after = (zoo / "entries" / eid / "train_log.jsonl").read_text().splitlines()
        assert after[: len(before)] == before
        assert [json.loads(x)["epoch"] for x in after] == [1, 2]
        starts = [r for r in zoo_log(zoo, eid) if r["event"] == "start"]
        resumed += starts[-1]["resume"] and starts[-1]["from_epoch"] >= len(before)
    TALLY["data_lost"] += resumed == 0
    assert resumed >= 1, "no entry resumed from the epochs it had checkpointed"
    capsys.readouterr()
    assert main(["zoo", "verify", str(zoo)]) == 0, capsys.readouterr()
    TALLY["clean_errors"] += 1


def test_verify_names_an_unfinished_entry_as_ls_does(interrupted_zoo):
    """The interrupted zoo before its rerun: `zoo verify` and `zoo ls` use one word for each entry's state."""
    _, s = interrupted_zoo
    assert s["ls"].returncode == 0, s["ls"].stderr
    rows = {r["id"]: r["status"] for r in json.loads(s["ls"].stdout)}
    assert "partial" in rows.values()  # an entry had checkpointed an epoch when it was interrupted
    assert s["verify"].returncode == 1
    for eid, status in rows.items():
        if status != "done":
            assert f"entry {eid}: not finished ({status})" in s["verify"].stdout, (status, s["verify"].stdout)


def test_the_weights_metadata_is_written_the_same_way_every_time(tmp_path):
    """safetensors writes a metadata map with several keys in a random order: the record is one key, so the same
    weights and record give the same bytes (same seed ⇒ same bytes)."""
    import torch
    from safetensors.torch import save_file

    from testbed.training.provenance import weights_metadata

    config = {"dataset": {"path": "/x/d.h5", "content_hash": "ab" * 32, "attack": None, "num_train": 3}}
    files = set()
    for i in range(12):
        save_file({"w": torch.ones(3)}, str(tmp_path / "m.safetensors"), metadata=weights_metadata(config))
        files.add((tmp_path / "m.safetensors").read_bytes())
    assert len(files) == 1


def _wait_for_ctrl_c(target, job_id, device, threads, progress, stale_after):
    """A pool task (module level: a spawned worker imports it). ``quick``: returns at once; ``wait-S``: writes its
    file, then sleeps S seconds unless interrupted."""
    if job_id == "quick":
        return {"status": "done", "pid": os.getpid()}
    try:
        Path(target, job_id).write_text(str(os.getpid()))
        time.sleep(float(job_id.split("-")[1]))
    except KeyboardInterrupt:
        return {"status": "interrupted"}
    return {"status": "done"}


def _one_result(pool, handle, timeout: float) -> dict:
    try:
        done = pool.wait([handle], timeout=timeout)
    except BaseException as e:  # noqa: BLE001 - a KeyboardInterrupt leaking out of the pool is this test's failure
        pytest.fail(f"the pool raised {type(e).__name__}")
    assert len(done) == 1, "the job did not end in time"
    return done[0][1]


def _run_job(pool, tmp_path: Path, job: str) -> dict:
    """Start ``job`` (a ``wait-S``), SIGINT its worker once the job runs, return its result."""
    handle = pool.start(job)
    deadline = time.time() + 120
    while not (tmp_path / job).is_file() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / job).is_file(), "the job never started"
    time.sleep(0.2)  # inside its sleep
    os.kill(int((tmp_path / job).read_text()), signal.SIGINT)
    return _one_result(pool, handle, 60)


def _quick_pid(pool) -> int:
    return _one_result(pool, pool.start("quick"), 120)["pid"]


def _pool(tmp_path: Path, sigint) -> object:
    """A one-worker pool made by a builder whose SIGINT handler is ``sigint`` (restored after)."""
    from testbed.execution.executors import ProcessExecutor

    before = signal.signal(signal.SIGINT, sigint)
    try:
        return ProcessExecutor(tmp_path, 1, "cpu", 9.0, True, 1, task=_wait_for_ctrl_c)
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_pool_worker_ignores_ctrl_c_while_idle_and_takes_it_inside_a_job(tmp_path, capfd):
    """Ctrl-C reaches every process of the terminal's group. A worker waiting for work must not die of it (its
    traceback from the pool's queue reached the terminal and broke the pool); a worker running a job gets the
    KeyboardInterrupt there, as the job would inline, so the job keeps its checkpoint and ends."""
    pool = _pool(tmp_path, signal.default_int_handler)
    try:
        pid = _quick_pid(pool)
        os.kill(pid, signal.SIGINT)  # idle
        time.sleep(1.0)
        assert _quick_pid(pool) == pid, "the idle worker died of Ctrl-C"
        assert _run_job(pool, tmp_path, "wait-60") == {"status": "interrupted"}
        os.kill(pid, signal.SIGINT)  # idle again, after a job
        time.sleep(1.0)
        assert _quick_pid(pool) == pid
    finally:
        pool.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_a_builder_started_with_ctrl_c_ignored_keeps_its_workers_deaf_to_it(tmp_path, capfd):
    """A build started as a background job (SIGINT ignored, POSIX) is not interrupted through its workers either."""
    pool = _pool(tmp_path, signal.SIG_IGN)
    try:
        assert _run_job(pool, tmp_path, "wait-5") == {"status": "done"}
    finally:
        pool.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
