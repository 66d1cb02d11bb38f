"""The trainer and run files: determinism, crash + resume, DDP, NaN guard, safe loading, data subsets."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from testbed import cli
from testbed.data import h5data
from testbed.core.errors import UserError
from testbed.training.runs import load_run
from testbed.training.loop import TrainConfig, train

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """24 train / 8 test synthetic 32×32 scenes: a few steps per epoch, seconds per run on a busy CPU."""
    from testbed.data.synth import make_synth_dataset

    return make_synth_dataset(tmp_path_factory.mktemp("train-data") / "tiny.h5", n_train=24, n_test=8, size=32, seed=3)


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory) -> Path:
    """A finished 1-epoch run; tests that damage a run work on a copy."""
    return train(tiny_data, tmp_path_factory.mktemp("runs") / "run", _cfg(), progress=False, score=False)


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _cfg(**kw) -> TrainConfig:
    base = dict(model="deeplabv3_tiny", epochs=1, batch_size=8, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _env() -> dict[str, str]:
    # the child must use the same number of threads as this process: float reductions depend on it
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _bytes(run: Path) -> bytes:
    return (run / "model.safetensors").read_bytes()


def _tensor_bytes(run: Path) -> bytes:
    """Every tensor's bytes, in name order: the weights without the file's metadata."""
    from safetensors.torch import load_file

    state = load_file(str(run / "model.safetensors"))
    return b"".join(k.encode() + state[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k in sorted(state))


def test_same_seed_same_bytes_and_other_seed_differs(tiny_data, finished_run, tmp_path):
    a = finished_run  # seed 0
    b = train(tiny_data, tmp_path / "b", _cfg(seed=0), progress=False, score=False)
    c = train(tiny_data, tmp_path / "c", _cfg(seed=1), progress=False, score=False)
    assert _bytes(a) == _bytes(b)
    assert _bytes(a) != _bytes(c)
    model, config = load_run(a)
    assert not model.training and config["train"]["seed"] == 0


def test_run_dir_contents(tiny_data, tmp_path):
    run = train(tiny_data, tmp_path / "run", _cfg(epochs=2), progress=False)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["model.safetensors", "config.json", "train_log.jsonl", "metrics.json", "checkpoint.pt"]
    )
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"]["content_hash"] == h5data.content_hash(tiny_data)
    with h5data.open_dataset(tiny_data) as f:
        assert config["classes"] == f.classes and config["num_classes"] == f.num_classes
    assert config["model"] == "deeplabv3_tiny" and config["train"]["epochs"] == 2
    assert config["versions"]["torch"] == torch.__version__
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(r["images"] == 24 and r["steps"] == 3 and r["images_per_s"] > 0 for r in log)
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in log)
    # each epoch's CPU seconds (this process's, all threads) and their sum in config.json: what a run cost
    assert all(r["cpu_seconds"] > 0 for r in log)
    assert config["training_cpu_seconds"] == pytest.approx(sum(r["cpu_seconds"] for r in log), abs=1e-3)
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR", "PBA", "per_class_iou_b"} <= set(metrics)
    # the scores belong to the saved weights: re-score independently by plain argmax vs ground truth
    model, _ = load_run(run)
    with h5data.open_dataset(tiny_data) as f:
        x, y = f["test/images"], f["test/labels"]
    with torch.no_grad():
        pred = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)["out"].argmax(1).numpy()
    valid = y != 255
    assert metrics["PA-B"] == pytest.approx(100 * (pred[valid] == y[valid]).mean(), abs=1e-6)


def test_sigkill_then_resume_is_bit_exact(tiny_data, tmp_path):
    ref = cli.main(["-q", "train", str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "2", "--batch-size", "4",
                    "--device", "cpu", "--no-score", "--out", str(tmp_path / "ref")])
    assert ref == 0
    run = tmp_path / "killed"
    # `python -m testbed.cli` from the checkout: this checkout's code, whichever copy the console script points at
    args = [sys.executable, "-m", "testbed.cli", "-q", "train", str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "2",
            "--batch-size", "4", "--device", "cpu", "--no-score", "--out", str(run)]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "model.safetensors").exists()
    epoch_done = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert epoch_done == 1
    if (run / "train_log.jsonl").exists():  # whatever exists under a final name is complete
        assert [json.loads(line)["epoch"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1]

    rc = cli.main(["-q", "train", str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "2", "--batch-size", "4",
                   "--device", "cpu", "--no-score", "--out", str(run), "--resume"])
    assert rc == 0
    assert _bytes(run) == _bytes(tmp_path / "ref")
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "stale temp files were not cleaned up"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    # the run's CPU seconds add up the killed process's first epoch and the resumed one's second
    config = json.loads((run / "config.json").read_text())
    assert config["training_cpu_seconds"] == pytest.approx(log[0]["cpu_seconds"] + log[1]["cpu_seconds"], abs=1e-3)


def test_a_run_resumed_from_epochs_without_cpu_seconds_does_not_claim_a_total():
    from testbed.training.loop import _cpu_seconds

    assert _cpu_seconds([{"cpu_seconds": 1.25}, {"cpu_seconds": 2.5}]) == 3.75
    assert _cpu_seconds([{"seconds": 3.0}, {"cpu_seconds": 2.5}]) is None  # an epoch trained before it was recorded
    assert _cpu_seconds([]) is None


def test_resume_and_overwrite_rules(tiny_data, finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    base = ["-q", "train", str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--no-score", "--out", str(run)]
    assert cli.main(base) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(base + ["--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "lr" in err
    assert cli.main(base + ["--resume"]) == 0  # a finished run of the same config: nothing left to do
    assert cli.main(base[:-2] + ["--out", str(tmp_path / "fresh"), "--resume"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    before = _bytes(run)
    assert cli.main(base + ["--overwrite", "--seed", "5"]) == 0
    assert _bytes(run) != before


def test_torchrun_two_process_gloo(tiny_data, tmp_path):
    run = tmp_path / "ddp"
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "testbed.cli", "-q", "train",
           str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
           "--no-score", "--out", str(run)]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    model, config = load_run(run)
    assert config["world_size"] == 2
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    # 24 samples over 2 ranks × batch 4 = 3 steps per rank, 24 images in total
    assert log[0]["steps"] == 3 and log[0]["images"] == 24
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))["out"]
    assert out.shape == (2, config["num_classes"], 32, 32) and torch.isfinite(out).all()


def test_nan_loss_stops_with_exit_2(tiny_data, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = cli.main(["-q", "train", str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "2", "--lr", "1e30",
                   "--optimizer", "sgd", "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "--lr" in err and "Traceback" not in err
    assert not out.exists()  # nothing was checkpointed, so no partial output remains


def test_nan_in_second_epoch_keeps_first_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    import testbed.training.loop as tr

    calls = {"n": 0}
    real_loss = tr.seg_loss

    def loss_nan_from_step_4(logits, target):  # 24 / 8 = 3 steps per epoch: epoch 2 step 1 goes NaN
        calls["n"] += 1
        loss = real_loss(logits, target)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(tr, "seg_loss", loss_nan_from_step_4)
    out = tmp_path / "nan2"
    rc = cli.main(["-q", "train", str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "2", "--batch-size", "8",
                   "--device", "cpu", "--log-every", "100", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "epoch 2 step 1" in err and "checkpoint.pt" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "model.safetensors").exists()
    # and the kept checkpoint resumes (with the bug gone) into a complete run
    monkeypatch.setattr(tr, "seg_loss", real_loss)
    assert cli.main(["-q", "train", str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "2", "--batch-size", "8",
                     "--device", "cpu", "--log-every", "100", "--no-score", "--out", str(out), "--resume"]) == 0
    load_run(out)


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_weights_refused_and_never_executed(finished_run, tmp_path, writer):
    run = _copy(finished_run, tmp_path / "run")
    marker = tmp_path / "PWNED"
    evil = _Evil()
    evil.marker = str(marker)
    if writer == "pickle":
        (run / "model.safetensors").write_bytes(pickle.dumps({"weights": evil}))
    else:
        torch.save({"weights": evil}, run / "model.safetensors")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_run(run)
    assert not marker.exists()


def test_missing_or_mismatched_runs_are_user_errors(finished_run, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_run(tmp_path / "nope")
    run = _copy(finished_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["num_classes"] += 1
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="wrong shapes"):
        load_run(run)
    (run / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors"):
        load_run(run)


def test_train_indices_equal_training_on_those_rows_only(tiny_data, tmp_path):
    rows = np.array([20, 3, 17, 5, 22, 11, 8, 12, 14, 0, 19, 6])
    with h5data.open_dataset(tiny_data) as f:
        arrays = {"train/images": f["train/images"][rows], "train/labels": f["train/labels"][rows],
                  "test/images": f["test/images"], "test/labels": f["test/labels"]}
        classes = f.classes
    subset = h5data.write_dataset(tmp_path / "subset.h5", arrays, classes, source={"test": "subset"})
    a = train(tiny_data, tmp_path / "a", _cfg(batch_size=4), train_indices=rows, progress=False, score=False)
    b = train(subset, tmp_path / "b", _cfg(batch_size=4), progress=False, score=False)
    full = train(tiny_data, tmp_path / "full", _cfg(batch_size=4), progress=False, score=False)
    # the same tensors bit for bit (the files differ only in the weights' record of their training file)
    assert _tensor_bytes(a) == _tensor_bytes(b) != _tensor_bytes(full)
    config = json.loads((a / "config.json").read_text())
    expected = hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest()
    assert config["train_indices"] == {"count": 12, "sha256": expected}
    log = json.loads((a / "train_log.jsonl").read_text().splitlines()[0])
    assert log["images"] == 12 and log["steps"] == 3
    with pytest.raises(UserError, match="out of range"):
        train(tiny_data, tmp_path / "c", _cfg(), train_indices=[0, 24], progress=False, score=False)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"optimizer": "adam9"}, "optimizer"),
        ({"schedule": "step"}, "schedule"),
        ({"model": "deeplabv3_tiyn"}, "did you mean 'deeplabv3_tiny'"),
        ({"amp": "maybe"}, "amp"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(UserError, match=msg):
        _cfg(**kw)


def test_amp_on_cpu_is_a_user_error(tiny_data, tmp_path, capsys):
    rc = cli.main(["-q", "train", str(tiny_data), "--model", "deeplabv3_tiny", "--device", "cpu", "--amp",
                   "--out", str(tmp_path / "r")])
    assert rc == 2 and "--amp needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_lr_schedules_shape():
    from testbed.training.loop import lr_factor

    total = 100
    one = [lr_factor(s, total, "onecycle", 0.1) for s in range(total)]
    poly = [lr_factor(s, total, "poly", 0.1) for s in range(total)]
    assert one[0] == pytest.approx(1 / 25) and max(one) == pytest.approx(1.0) and one[-1] < 0.01
    assert poly[0] == pytest.approx(0.1) and poly[10] == pytest.approx(1.0)
    assert poly[-1] == pytest.approx((1 - 89 / 90) ** 0.9)
    assert all(a >= b for a, b in zip(one[10:], one[11:])) and all(a >= b for a, b in zip(poly[10:], poly[11:]))


def test_ctrl_c_keeps_checkpoint_and_says_how_to_resume(tiny_data, tmp_path, monkeypatch, capsys):
    import testbed.training.loop as tr

    calls = {"n": 0}
    real_loss = tr.seg_loss

    def interrupt_at_step_4(logits, target):  # 3 steps per epoch: Ctrl-C during epoch 2
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_loss(logits, target)

    monkeypatch.setattr(tr, "seg_loss", interrupt_at_step_4)
    out = tmp_path / "int"
    rc = cli.main(["-q", "train", str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "2", "--batch-size", "8",
                   "--device", "cpu", "--no-score", "--out", str(out)])
    assert rc == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "after epoch 1" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (out / "model.safetensors").exists()


def test_flip_moves_images_and_labels_together():
    from testbed.training.loop import _to_device

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 5, 7, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 11, (32, 5, 7), dtype=torch.uint8, generator=g)
    x, y = _to_device(images, labels, torch.device("cpu"), False, torch.Generator().manual_seed(1))
    x2, _ = _to_device(images, labels, torch.device("cpu"), False, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)  # seeded
    plain = images.permute(0, 3, 1, 2).float() / 255
    flipped = [i for i in range(32) if not torch.equal(x[i], plain[i])]
    assert 4 < len(flipped) < 28
    for i in range(32):
        if i in flipped:
            assert torch.equal(x[i], plain[i].flip(-1)) and torch.equal(y[i], labels[i].long().flip(-1))
        else:
            assert torch.equal(y[i], labels[i].long())
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (32, 3, 5, 7)


@pytest.mark.parametrize("threads", [1, 2])
def test_config_records_the_thread_count(tiny_data, tmp_path, threads):
    """CPU bytes depend on the thread count (a conv's reductions are split per thread), so the run says it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = train(tiny_data, tmp_path / "r", _cfg(), progress=False, score=False)
    finally:
        torch.set_num_threads(previous)
    assert json.loads((run / "config.json").read_text())["threads"] == threads


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimizer_follows_torchs_reference_update(optimizer):
    """make_optimizer's fused kernel against torch's plain per-parameter loop: the same update rule."""
    from testbed.training.loop import make_optimizer

    def run(make) -> torch.Tensor:
        torch.manual_seed(0)
        # no BatchNorm: a conv bias before it gets a zero-in-theory gradient (rounding noise), whose Adam step is
        # ±lr whatever the kernel; elsewhere the two kernels agree to rounding
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
        opt = make(net.parameters())
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            opt.zero_grad()
            net(torch.rand(4, 3, 9, 9, generator=g)).square().mean().backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    cfg = _cfg(optimizer=optimizer)
    ours = run(lambda ps: make_optimizer(ps, cfg))
    assert all(g.get("fused") for g in make_optimizer(torch.nn.Linear(2, 2).parameters(), cfg).param_groups)
    if optimizer == "sgd":
        ref = run(lambda ps: torch.optim.SGD(ps, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                             foreach=False))
    else:
        ref = run(lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False))
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_torch_threads_sets_and_always_restores():
    """testbed.core.device.torch_threads: the block runs with the count asked for; the caller's count comes back, also
    after an error; None leaves it alone (the zoo, bench workers and demo fix their thread count with it)."""
    from testbed.core.device import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(2):
            assert torch.get_num_threads() == 2
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_train_and_score_take_threads(finished_run, tiny_data, tmp_path, monkeypatch, capsys):
    """`--threads N` runs training and scoring with N torch threads (recorded in config.json), then restores the
    caller's count; 0 is a user error that writes nothing."""
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    rc = cli.main(["-q", "train", str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "1", "--batch-size", "8",
                   "--device", "cpu", "--no-score", "--threads", str(want), "--out", str(tmp_path / "r")])
    assert rc == 0 and torch.get_num_threads() == before
    assert json.loads((tmp_path / "r" / "config.json").read_text())["threads"] == want
    from testbed.scoring import scorer

    seen = []
    real = scorer.score_model
    monkeypatch.setattr(scorer, "score_model", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    assert cli.main(["score", str(finished_run), "--data", str(tiny_data), "--device", "cpu", "--json",
                     "--threads", str(want)]) == 0
    assert seen == [want] and torch.get_num_threads() == before
    capsys.readouterr()
    for cmd in (["train", str(tiny_data), "--model", "deeplabv3_tiny", "--out", str(tmp_path / "z")],
                ["score", str(finished_run), "--data", str(tiny_data)]):
        assert cli.main(["-q", *cmd, "--threads", "0"]) == 2
        err = capsys.readouterr().err
        assert "--threads must be an integer >= 1, got 0" in err and "Traceback" not in err
    assert not (tmp_path / "z").exists()


def _fake_cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / f"cpuinfo-{abs(hash(flags))}"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                    "model name\t: other\nflags\t\t: fpu\n")
    return path


def test_cpu_bf16_support_reads_the_flags_never_assumes(tmp_path):
    from testbed.core.device import cpu_bf16_support

    amx = cpu_bf16_support(_fake_cpuinfo(tmp_path, "fpu sse avx512f amx_bf16 amx_tile avx512_bf16"))
    assert amx["native_bf16"] and amx["bf16_flags"] == ["avx512_bf16", "amx_bf16"] and amx["amx_tile"]
    assert amx["model"] == "Test CPU 9000"  # the first CPU's lines
    epyc = cpu_bf16_support(_fake_cpuinfo(tmp_path, "fpu sse avx2 avx512f"))
    assert not epyc["native_bf16"] and epyc["bf16_flags"] == [] and not epyc["amx_tile"]
    missing = cpu_bf16_support(tmp_path / "no-such-cpuinfo")
    assert not missing["native_bf16"] and missing["bf16_flags"] == []


@pytest.mark.parametrize("native,enabled", [(True, True), (True, False), (False, True)])
def test_precision_auto_follows_the_cpu_flags_and_the_run_records_why(tiny_data, tmp_path, monkeypatch, native,
                                                                       enabled):
    """``auto`` takes bf16 only on a CPU with native bf16, and only once bf16 is switched on for ``auto``
    (``CPU_AUTO_BF16``, off until the quality-equivalence table shows fp32 and bf16 agree)."""
    import testbed.training.loop as tr

    flags = ["avx512_bf16"] if native else []
    fake = {"model": "Test CPU", "bf16_flags": flags, "amx_tile": False, "capability": "AVX2", "native_bf16": native}
    monkeypatch.setattr(tr, "cpu_bf16_support", lambda: dict(fake))
    monkeypatch.setattr(tr, "CPU_AUTO_BF16", enabled)
    bf16 = native and enabled
    prec = tr.resolve_precision(_cfg(), torch.device("cpu"))
    assert (prec.amp, prec.name, prec.channels_last) == ((True, "bf16", True) if bf16 else (False, "fp32", False))
    assert prec.dtype == torch.bfloat16
    for asked, amp in (("fp32", False), ("bf16", True)):  # an explicit choice wins over the flags
        assert tr.resolve_precision(_cfg(precision=asked), torch.device("cpu")).amp is amp
    assert not tr.resolve_precision(_cfg(precision="bf16", channels_last=False), torch.device("cpu")).channels_last
    run = train(tiny_data, tmp_path / "r", _cfg(), progress=False, score=False)
    rec = json.loads((run / "config.json").read_text())["precision"]
    assert rec["used"] == prec.name and rec["cpu"] == fake
    assert rec["memory_format"] == ("channels_last" if bf16 else "contiguous")
    assert ("native bf16" in rec["why"]) and (("no native" in rec["why"]) is not native)
    assert ("until bf16's quality" in rec["why"]) is (native and not enabled)


def test_checkpoint_of_an_earlier_version_resumes(tiny_data, tmp_path):
    """A checkpoint written before ``precision`` and ``val_every`` existed ran fp32 with the defaults: it resumes."""
    import testbed.training.loop as tr
    from testbed.training.rundir import load_checkpoint, save_checkpoint

    run = train(tiny_data, tmp_path / "r", _cfg(epochs=2), progress=False, score=False)
    ckpt = load_checkpoint(run / tr.CHECKPOINT)
    ckpt["identity"].pop("precision")
    for key in ("precision", "val_every"):
        ckpt["identity"]["train"].pop(key)
    ckpt["epoch"], ckpt["log"] = 1, ckpt["log"][:1]
    save_checkpoint(ckpt, run / tr.CHECKPOINT)
    (run / "model.safetensors").unlink()
    train(tiny_data, run, _cfg(epochs=2), resume=True, progress=False, score=False)
    assert (run / "model.safetensors").is_file()
    ckpt["identity"]["train"]["lr"] = 0.5  # a setting that differs is still refused
    save_checkpoint(ckpt, run / tr.CHECKPOINT)
    with pytest.raises(UserError, match="different settings"):
        train(tiny_data, run, _cfg(epochs=2), resume=True, progress=False, score=False)


def test_precision_setting_is_checked():
    with pytest.raises(UserError, match="--precision must be one of auto, fp32, bf16, got 'fp16'"):
        _cfg(precision="fp16")
    from testbed.training.loop import resolve_precision

    with pytest.raises(UserError, match="--amp needs a CUDA device"):
        resolve_precision(_cfg(amp=True, precision="bf16"), torch.device("cpu"))


def test_bf16_runs_are_byte_identical_and_differ_from_fp32(tiny_data, tmp_path):
    """Determinism holds on the bf16 path too: same settings, same machine, same bytes."""
    from testbed.core.device import cpu_bf16_support

    if not cpu_bf16_support()["native_bf16"]:
        pytest.skip("this CPU has no native bf16 (no avx512_bf16/amx_bf16 flag): bf16 would run emulated, and "
                    "`--precision auto` never picks it here")
    a = train(tiny_data, tmp_path / "a", _cfg(precision="bf16"), progress=False, score=False)
    b = train(tiny_data, tmp_path / "b", _cfg(precision="bf16"), progress=False, score=False)
    c = train(tiny_data, tmp_path / "c", _cfg(precision="fp32"), progress=False, score=False)
    assert _bytes(a) == _bytes(b)
    assert _bytes(a) != _bytes(c)  # the autocast really ran
    assert json.loads((a / "config.json").read_text())["precision"]["used"] == "bf16"


def test_cli_precision_and_epoch_lines_in_a_log(tiny_data, tmp_path, capsys, monkeypatch):
    """`--precision fp32` reaches the run; without a TTY (pytest's captured stderr) every epoch gets one line
    with its loss, images/s and seconds."""
    from testbed.core import progress

    monkeypatch.setattr(progress, "_quiet", False)  # an earlier `-q` in this process leaves it set
    monkeypatch.setenv("TESTBED_PROGRESS_SECONDS", "0")  # no "still running" lines on a slow machine: the epoch lines only
    rc = cli.main(["train", str(tiny_data), "--model", "deeplabv3_tiny", "--epochs", "2", "--batch-size", "8",
                   "--device", "cpu", "--no-score", "--precision", "fp32", "--out", str(tmp_path / "r")])
    assert rc == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["train"]["precision"] == "fp32" and config["precision"]["used"] == "fp32"
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 2, lines
    for i, line in enumerate(lines, 1):
        assert re.fullmatch(rf"epoch {i}/2: loss \d+\.\d{{4}}, \d+ img/s, \d+\.\ds", line), line


def test_ctrl_c_inside_a_checkpoint_write_is_a_keyboard_interrupt(tmp_path, monkeypatch):
    """Ctrl-C landing in one of torch.save's writes: torch.save turns it into a RuntimeError ("unexpected pos")
    when it closes the archive; save_checkpoint re-raises the KeyboardInterrupt (so the CLI's one-line
    "interrupted" path takes it, not a traceback) and the existing checkpoint is untouched."""
    import builtins

    import torch

    from testbed.training import rundir

    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    real_open, writes = builtins.open, []

    class Interrupted:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            writes.append(len(b))
            if len(writes) == 3:
                raise KeyboardInterrupt
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(rundir, "open", lambda p, mode="r": Interrupted(real_open(p, mode)), raising=False)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint({"w": torch.zeros(50_000)}, path)
    assert len(writes) >= 3 and path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left
