"""The segmentation_models_pytorch models: contract, smp as the reference, offline creation, weights, image
sizes, the trainer's paths (resume bit-exact, channels_last, DDP's every-parameter-used), every defense.

One intra-op thread here: the tiny models' ops are so small that a second thread only adds synchronisation,
and on a loaded machine a descheduled second thread made a 32×32 forward up to 100× slower.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from testbed import cli, models

K = 5
SMP_TINY = ["segformer_tiny", "deeplabv3plus_tiny", "pspnet_tiny", "upernet_tiny", "unet_tiny"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _x(n: int = 2, h: int = 64, w: int | None = None, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w or h, generator=torch.Generator().manual_seed(seed))


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("name", SMP_TINY)
def test_tiny_contract_classifier_last_and_features(name):
    torch.manual_seed(0)
    model = models.create(name, K, aux_loss=True).eval()
    conv = model.classifier
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == K
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules() if isinstance(m, nn.Conv2d)]
    x = _x()
    with torch.no_grad():
        out = model(x)
        for h in hooks:
            h.remove()
        feats, logits = models.classifier_features(model, x)
        # independent: the 1×1 conv by hand (einsum), then bilinear upsampling to the input size
        manual = torch.einsum("kc,nchw->nkhw", conv.weight[:, :, 0, 0], feats) + conv.bias.view(1, -1, 1, 1)
        manual = F.interpolate(manual, size=(64, 64), mode="bilinear", align_corners=False)
    assert order[-1] is conv  # the aux head runs first
    assert list(out) == ["out", "aux"] and out["out"].shape == out["aux"].shape == (2, K, 64, 64)
    assert torch.isfinite(out["out"]).all() and torch.isfinite(out["aux"]).all()
    assert feats.shape[:2] == (2, conv.in_channels)
    torch.testing.assert_close(logits, out["out"])
    torch.testing.assert_close(manual, logits, rtol=1e-4, atol=1e-4)
    assert list(models.create(name, K).eval()(x[:1])) == ["out"]


def test_tiny_sizes_under_one_million_parameters():
    for name in SMP_TINY:
        total = sum(p.numel() for m in models.create(name, 11).modules() for p in m.parameters(recurse=False))
        assert 0 < total <= 1_000_000, (name, total)


@pytest.mark.parametrize(
    "name,arch,encoder,kwargs",
    [
        ("segformer_mit_b0", "segformer", "mit_b0", {}),
        ("deeplabv3plus_mobilenet_v2", "deeplabv3plus", "mobilenet_v2", {}),
        ("pspnet_resnet18", "pspnet", "resnet18", {"encoder_depth": 5, "output_stride": 8, "upsampling": 8}),
        ("upernet_tiny", "upernet", "tu-resnet18", {"decoder_channels": 48, "layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}),
    ],
)
def test_same_encoder_and_decoder_as_smp(name, arch, encoder, kwargs):
    """smp as the reference implementation: same seed ⇒ the same encoder/decoder weights and features."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    ours = models.create(name, K).eval()
    torch.manual_seed(0)
    ref = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=K, **kwargs).eval()
    assert ours.backbone.state_dict().keys() == ref.encoder.state_dict().keys()
    assert all(torch.equal(v, ref.encoder.state_dict()[k]) for k, v in ours.backbone.state_dict().items())
    assert all(torch.equal(v, ref.decoder.state_dict()[k]) for k, v in ours.head.state_dict().items())
    # parameter count: smp's model minus its segmentation head, plus our 1×1 classifier
    head = ref.segmentation_head[0]
    assert _params(ours) == _params(ref) - _params(head) + head.in_channels * K + K
    x = _x(1)
    with torch.no_grad():
        feats, _ = models.classifier_features(ours, x)
        torch.testing.assert_close(feats, ref.decoder(ref.encoder((x - MEAN) / STD)))


def test_segformer_decoder_width_follows_the_paper():
    torch.manual_seed(0)
    assert models.create("segformer_mit_b0", K).classifier.in_channels == 256
    assert models.create("segformer_mit_b2", K).classifier.in_channels == 768


def test_every_parameter_gets_a_gradient():
    """DDP (without find_unused_parameters) needs every parameter in the graph; so do honest param counts."""
    for name in SMP_TINY:
        torch.manual_seed(0)
        model = models.create(name, K, aux_loss=True).train()
        out = model(_x(2, 32))
        (F.cross_entropy(out["out"], torch.zeros(2, 32, 32, dtype=torch.long)) + out["aux"].mean()).backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None]
        assert not unused, (name, unused[:3])


@pytest.mark.parametrize("name", SMP_TINY)
def test_channels_last_and_bf16_autocast_forward(name):
    torch.manual_seed(0)
    model = models.create(name, K, aux_loss=True).eval()
    x = _x(2, 32)
    with torch.no_grad():
        ref = model(x)["out"]
        model.to(memory_format=torch.channels_last)
        cl = model(x.contiguous(memory_format=torch.channels_last))["out"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    assert low["out"].shape == ref.shape and torch.isfinite(low["out"].float()).all()


def test_same_seed_same_init():
    def state(seed):
        torch.manual_seed(seed)
        return models.create("segformer_tiny", K, aux_loss=True).state_dict()

    a, b, c = state(1), state(1), state(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------------------------------ names
def test_unknown_names_suggest_the_nearest():
    with pytest.raises(models.UnknownModelError) as e:
        models.create("deeplabv3plus_resnet19", K)
    assert "did you mean 'deeplabv3plus_resnet18'" in str(e.value)
    assert "deeplabv3plus takes: mobilenet_v2, mobilenet_v3_large, resnet101, resnet18" in str(e.value)
    with pytest.raises(models.UnknownModelError, match=r"segformer takes: mit_b0, mit_b1, .*mit_b5, tiny"):
        models.create("segformer_resnet18", K)  # smp knows the encoder, this registry does not pair them
    with pytest.raises(models.UnknownModelError, match="unet takes"):
        models.create("unet_efficientnet-b0", K)


# ------------------------------------------------------------------------------------------ offline
_OFFLINE = textwrap.dedent("""
    import json, os, socket, sys
    class Blocked(OSError):
        pass
    def refuse(*a, **k):
        raise Blocked("network access attempted")
    socket.socket.connect = socket.socket.connect_ex = refuse
    socket.create_connection = socket.getaddrinfo = refuse
    try:
        socket.create_connection(("127.0.0.1", 9))
        sys.exit("socket guard not active")
    except Blocked:
        pass
    import time
    import torch
    from testbed import models
    t = time.perf_counter()
    available = models.available()
    seconds = time.perf_counter() - t
    lazy = not {"segmentation_models_pytorch", "timm"} & set(sys.modules)  # imported only to build a model
    torch.set_num_threads(1)
    names = sys.argv[1:]
    for name in names:
        torch.manual_seed(0)
        m = models.create(name, 3).eval()
        with torch.no_grad():
            assert m(torch.rand(1, 3, 32, 32))["out"].shape == (1, 3, 32, 32)
    print(json.dumps({"built": names, "available": len(available), "seconds": seconds, "lazy": lazy}))
""")


def test_creation_never_touches_the_network(tmp_path):
    """Every encoder family (smp's own, MiT, timm's tu-) and every tiny model, built with the network blocked
    and empty, private cache directories that must stay empty.  Also: ``available()`` is instant and does
    not import smp or timm."""
    names = SMP_TINY + ["segformer_mit_b0", "deeplabv3plus_mobilenet_v2"]
    caches = {k: tmp_path / k for k in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **{k: str(v) for k, v in caches.items()}}
    res = subprocess.run([sys.executable, "-c", _OFFLINE, *names], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["built"] == names and report["available"] == len(models.available())
    assert report["seconds"] < 0.01 and report["lazy"]
    assert not any(p.exists() and any(p.rglob("*")) for p in caches.values())


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("name", ["segformer_tiny", "upernet_tiny"])
def test_safetensors_backbone_round_trip(name, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = models.create(name, K)
    state = {k: v.contiguous() for k, v in src.backbone.state_dict().items()}
    extra = {"head.weight": torch.zeros(10, 4), "head.bias": torch.zeros(10)}  # MiT's ImageNet classifier: ignored
    save_file({**state, **extra}, str(tmp_path / "enc.safetensors"))
    torch.manual_seed(2)
    dst = models.create(name, 3, backbone_weights=tmp_path / "enc.safetensors")
    assert all(torch.equal(dst.backbone.state_dict()[k], v) for k, v in state.items())


def test_torchvision_resnet_loads_into_smp_encoder(tmp_path, monkeypatch):
    """smp's ResNet encoders keep torchvision's names: a torchvision state dict (file or hub cache) loads."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(5)
    tv = torchvision.models.resnet18()
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model = models.create("deeplabv3plus_resnet18", K, backbone_weights=str(tmp_path / "r18.safetensors"))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    ckpt = tmp_path / "hub" / "checkpoints" / os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    ckpt.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), ckpt)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    model = models.create("pspnet_resnet18", K, backbone_weights="imagenet")
    assert torch.equal(model.backbone.conv1.weight, tv.conv1.weight)
    with pytest.raises(models.BackboneWeightsError, match="no ImageNet weights") as e:
        models.create("segformer_mit_b0", K, backbone_weights="imagenet")
    assert "safetensors" in str(e.value)


def test_weights_of_another_architecture_refused(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}, str(tmp_path / "r18.safetensors"))
    with pytest.raises(models.BackboneWeightsError, match="does not match this backbone") as e:
        models.create("unet_resnet34", K, backbone_weights=tmp_path / "r18.safetensors")
    assert "missing: layer1.2" in str(e.value)  # resnet34 has a third block in layer1; resnet18 does not


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_refused_without_executing(tmp_path):
    marker = tmp_path / "marker"
    for filename in ("evil.pth", "evil.safetensors"):
        path = tmp_path / filename
        path.write_bytes(pickle.dumps({"patch_embed1.proj.weight": _Evil(str(marker))}))
        with pytest.raises(models.BackboneWeightsError, match="safetensors"):
            models.create("segformer_tiny", K, backbone_weights=path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ image size
def test_input_size_divisibility():
    cases = {"segformer_tiny": 32, "upernet_tiny": 32, "deeplabv3plus_tiny": 16, "pspnet_tiny": 8, "unet_tiny": 1}
    for name, divisor in cases.items():
        model = models.create(name, K).eval()
        assert model.size_divisor == divisor, name
        ok = _x(1, max(divisor, 16), 2 * max(divisor, 16))
        with torch.no_grad():
            assert model(ok)["out"].shape[-2:] == ok.shape[-2:]
        models.check_input_size(model, ok.shape[-2:])
        if divisor == 1:  # U-Net interpolates its skips: any size
            with torch.no_grad():
                assert model(_x(1, 50, 37))["out"].shape[-2:] == (50, 37)
            continue
        h, w = divisor + 4, divisor * 2
        for raise_it in (lambda: models.check_input_size(model, (h, w)), lambda: model(_x(1, h, w))):
            with pytest.raises(models.InputSizeError) as e:
                raise_it()
            up = (h + divisor - 1) // divisor * divisor
            assert f"model {name!r} needs image height and width divisible by {divisor}, got {h}x{w}" in str(e.value)
            assert f"{up}x{w}" in str(e.value)
    models.check_input_size(models.create("deeplabv3_tiny", K), (37, 50))  # the paper models take any size


def test_trainer_refuses_an_image_size_before_writing(tmp_path, capsys):
    from testbed.data.synth import make_synth_dataset

    data = make_synth_dataset(tmp_path / "s48.h5", n_train=4, n_test=2, size=48, seed=0)
    out = tmp_path / "run"
    rc = cli.main(["-q", "train", str(data), "--model", "segformer_tiny", "--epochs", "1", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "'segformer_tiny' needs image height and width divisible by 32, got 48x48" in err and "64x64" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


# ------------------------------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def data32(tmp_path_factory) -> Path:
    from testbed.data.synth import make_synth_dataset

    return make_synth_dataset(tmp_path_factory.mktemp("smp-data") / "s32.h5", n_train=8, n_test=4, size=32, seed=1)


def test_resume_is_bit_exact(data32, tmp_path, monkeypatch):
    """Interrupt after epoch 1 of 2, resume: the same bytes as an uninterrupted run (MiT has drop-path)."""
    from testbed.training import loop as train_mod

    cfg = dict(model="segformer_tiny", epochs=2, batch_size=4, seed=0, device="cpu", aux_loss=True)
    ref = train_mod.train(data32, tmp_path / "ref", train_mod.TrainConfig(**cfg), progress=False, score=False)
    real, calls = train_mod._run_epoch, []

    def stop_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_run_epoch", stop_in_second_epoch)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(data32, run, train_mod.TrainConfig(**cfg), progress=False, score=False)
    assert not (run / "model.safetensors").exists() and (run / "checkpoint.pt").exists()
    monkeypatch.setattr(train_mod, "_run_epoch", real)
    train_mod.train(data32, run, train_mod.TrainConfig(**cfg), resume=True, progress=False, score=False)
    assert (run / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_torchrun_two_process_gloo(data32, tmp_path):
    run = tmp_path / "ddp"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "testbed.cli", "-q",
           "train", str(data32), "--model", "segformer_tiny", "--aux-loss", "--epochs", "1", "--batch-size", "2",
           "--device", "cpu", "--no-score", "--out", str(run)]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    # 8 samples over 2 ranks × batch 2 = 2 steps per rank, 8 images in total
    assert config["world_size"] == 2 and log[0]["steps"] == 2 and log[0]["images"] == 8


def test_train_channels_last_then_load_and_score(data32, tmp_path):
    from testbed.training.runs import load_run
    from testbed.training.loop import TrainConfig, train

    run = train(data32, tmp_path / "cl", TrainConfig(model="pspnet_tiny", epochs=1, batch_size=4, device="cpu",
                                                     channels_last=True), progress=False)
    model, config = load_run(run)
    assert config["channels_last"] is True and config["model"] == "pspnet_tiny"
    assert isinstance(model, models.SmpSegmenter) and model.model_name == "pspnet_tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["mIoU-B"] <= 100


# ------------------------------------------------------------------------------------------ defenses
@pytest.fixture(scope="module")
def poisoned32(tmp_path_factory) -> Path:
    from testbed import attacks
    from testbed.data.synth import make_synth_dataset

    d = tmp_path_factory.mktemp("smp-def")
    clean = make_synth_dataset(d / "clean.h5", n_train=24, n_test=4, size=32, seed=2)
    return attacks.poison_file(clean, d / "badnets.h5", attack="badnets", trigger="line", rate=0.2, seed=0)


DEFENSE_PARAMS = {
    "fine-pruning": {"step": 0.25, "max_fraction": 0.5, "epochs": 1, "batch_size": 4},
    "trigger-synthesis": {"steps": 3, "max_candidates": 3, "batch_size": 4},
    "strip": {"n_overlays": 4},
    "activation-clustering": {"min_class_vectors": 4},
    "spectral-signature": {"min_class_vectors": 4},
    "abl": {"epochs": 1, "isolation_ratio": 0.1},
    "scale-up": {},
}


@pytest.mark.parametrize("name", SMP_TINY + ["deeplabv3_tiny", "denseaspp_tiny", "danet_tiny"])
def test_every_defense_runs_on_every_family(name, poisoned32):
    """Every built-in defense on one (untrained) tiny model per family: no per-model branches needed."""
    from testbed.defenses.registry import load_defense
    from testbed.evaluation.threat_model import make_context

    torch.manual_seed(0)
    model = models.create(name, 11).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for defense_name, params in DEFENSE_PARAMS.items():
        defense = load_defense(defense_name, **params)
        ctx = make_context(defense, poisoned32, device=torch.device("cpu"), seed=0)
        results[defense_name] = (defense.run(model, ctx), ctx)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model is left alone

    fp, _ = results["fine-pruning"]
    pruned = fp.details["pruned_channels"]
    assert all(0 <= c < model.classifier.in_channels for c in pruned)
    assert torch.all(fp.model.classifier.weight[:, pruned] == 0)
    ts, _ = results["trigger-synthesis"]
    assert len(ts.details["reached"]) == 3 and all(np.isfinite(v) for v in ts.details["norms"].values())
    assert all(np.isfinite(v["last_norm"]) for v in ts.details["unconverged"].values())
    strip, ctx = results["strip"]
    assert len(strip.details["clean_scores"]) == len(ctx.clean_images) and np.isfinite(strip.details["clean_scores"]).all()
    for defense_name in ("activation-clustering", "spectral-signature"):
        res, _ = results[defense_name]
        assert res.details["images_analysed"] == 24
        assert res.flagged_train.dtype == np.int64 and np.all((res.flagged_train >= 0) & (res.flagged_train < 24))
    abl, _ = results["abl"]
    assert abl.flagged_train.tolist() == sorted(abl.flagged_train.tolist()) and len(abl.flagged_train) == 3  # 10% of 24
    su, ctx = results["scale-up"]
    assert len(su.details["clean_scores"]) == len(ctx.clean_images) and np.isfinite(su.threshold)
    for res, _ in results.values():
        json.dumps(res.details, allow_nan=False)
