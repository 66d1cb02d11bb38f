"""models/: the registry, the forward contract, the classifier hook and backbone weight loading."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from testbed import models

K = 5
# the grid comes from the registry: a new head family (one models.HEADS entry) is tested by every test below
HEADS = tuple(models.HEADS)
BACKBONES = tuple(models.BACKBONES)


def _x(n: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_available_is_the_full_grid():
    """The paper's heads × backbones plus the smp models (tests/test_models_smp.py), sorted."""
    assert {"deeplabv3", "denseaspp", "danet"} <= set(HEADS)  # the paper's three heads and six backbones
    assert {"resnet18", "resnet50", "resnet101", "mobilenet_v3_large", "densenet121", "tiny"} <= set(BACKBONES)
    paper = {f"{h}_{b}" for h in HEADS for b in BACKBONES}
    cnn = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_large")
    smp = {f"segformer_mit_b{i}" for i in range(6)} | {f"{a}_{e}" for a in ("deeplabv3plus", "pspnet", "upernet", "unet") for e in cnn}
    smp |= {f"{a}_tiny" for a in ("segformer", "deeplabv3plus", "pspnet", "upernet", "unet")}
    assert models.available() == sorted(paper | smp)
    assert len(models.available()) == len(HEADS) * len(BACKBONES) + 6 + 4 * 6 + 5


def test_a_head_family_is_one_record(monkeypatch):
    """One HEADS entry (constructor + tiny arguments) is a working model family; nothing else to edit."""
    spec = models.HEADS["deeplabv3"]
    assert isinstance(spec, models.HeadSpec) and spec.tiny_kwargs["channels"] == 48
    assert models.create("deeplabv3_tiny", K).classifier.in_channels == 48
    wide = models.HeadSpec(models.HEADS["danet"].cls, {"channels": 8})
    monkeypatch.setitem(models.HEADS, "danet", wide)
    model = models._paper_model("danet", "tiny", K)  # the builder reads the record when called
    assert model.classifier.in_channels == 8


@pytest.mark.parametrize("name", sorted(f"{h}_{b}" for h in HEADS for b in BACKBONES))
def test_every_model_output_contract(name):
    torch.manual_seed(0)
    model = models.create(name, K, aux_loss=True).eval()
    conv = model.classifier
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == K
    size = 64 if name.endswith(("_tiny", "_resnet18", "_mobilenet_v3_large")) else 40  # keep the file fast on CPU
    with torch.no_grad():
        out = model(_x(1, size))
    assert list(out) == ["out", "aux"]
    assert out["out"].shape == (1, K, size, size) and out["aux"].shape == (1, K, size, size)
    assert torch.isfinite(out["out"]).all() and torch.isfinite(out["aux"]).all()


@pytest.mark.parametrize("name", ["deeplabv3_tiny", "denseaspp_tiny", "danet_tiny", "danet_mobilenet_v3_large"])
def test_no_aux_output_unless_asked(name):
    model = models.create(name, K).eval()
    assert model.aux_classifier is None
    with torch.no_grad():
        out = model(_x(1, 32))
    assert list(out) == ["out"] and out["out"].shape == (1, K, 32, 32)


@pytest.mark.parametrize(
    "backbone,stride", [("resnet18", 8), ("resnet50", 8), ("mobilenet_v3_large", 16), ("densenet121", 8), ("tiny", 4)]
)
def test_backbone_output_stride(backbone, stride):
    bb = models.BACKBONES[backbone]().eval()
    with torch.no_grad():
        feats = bb(torch.zeros(1, 3, 48, 48))
    assert feats["out"].shape == (1, bb.out_channels, 48 // stride, 48 // stride)
    assert feats["aux"].shape[1] == bb.aux_channels


@pytest.mark.parametrize("head", HEADS)
def test_tiny_models_train_mode_and_odd_input_size(head):
    """Training-mode forward (BatchNorm batch stats) and a non-square size the backbone does not divide."""
    model = models.create(f"{head}_tiny", K, aux_loss=True).train()
    out = model(_x(2, 50).expand(2, 3, 50, 50)[:, :, :, :37].contiguous())
    assert out["out"].shape == (2, K, 50, 37) and out["aux"].shape == (2, K, 50, 37)
    loss = F.cross_entropy(out["out"], torch.zeros(2, 50, 37, dtype=torch.long)) + out["aux"].mean()
    loss.backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0


def test_tiny_backbone_under_one_million_parameters():
    model = models.create("deeplabv3_tiny", K)
    count = 0
    for module in model.backbone.modules():  # independent count: walk modules, count their own tensors
        for p in module.parameters(recurse=False):
            count += p.numel()
    assert 0 < count <= 1_000_000
    for head in HEADS:
        total = sum(p.numel() for p in models.create(f"{head}_tiny", K).parameters())
        assert total <= 1_000_000, (head, total)


def test_input_is_normalized_inside_with_imagenet_stats():
    model = models.create("deeplabv3_tiny", K).eval()
    seen = []
    h = model.backbone.stem[0][0].register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
    x = _x(1, 32)
    with torch.no_grad():
        model(x)
    h.remove()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (x - mean) / std)


@pytest.mark.parametrize("name", ["danet_tiny", "danet_mobilenet_v3_large"])
def test_danet_gammas_are_zero_registered_parameters(name):
    model = models.create(name, K)
    gammas = {n: p for n, p in model.named_parameters() if n.endswith("gamma")}
    assert len(gammas) == 2  # one in the position branch, one in the channel branch
    for p in gammas.values():
        assert p.requires_grad and torch.equal(p.detach(), torch.zeros_like(p))
    if name != "danet_tiny":
        return
    # they learn: a training step gives them a non-zero gradient
    model.train()
    F.cross_entropy(model(_x(2, 32))["out"], torch.randint(0, K, (2, 32, 32))).backward()
    assert all(p.grad is not None and p.grad.abs().item() > 0 for p in gammas.values())


def test_danet_gamma_zero_means_attention_is_identity():
    """With gamma = 0 the attention modules return their input exactly (Fu et al.'s residual form)."""
    head = models.create("danet_tiny", K).head.eval()
    x = torch.randn(2, head.out_channels, 6, 7)
    assert torch.equal(head.pam(x), x) and torch.equal(head.cam(x), x)
    with torch.no_grad():
        head.pam.gamma.fill_(1.0)
    assert not torch.allclose(head.pam(x), x)


@pytest.mark.parametrize("name", ["deeplabv3_tiny", "denseaspp_tiny", "danet_tiny", "deeplabv3_mobilenet_v3_large"])
def test_classifier_is_the_last_conv(name):
    model = models.create(name, K, aux_loss=True).eval()
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules() if isinstance(m, nn.Conv2d)]
    b = torch.arange(1.0, K + 1)
    with torch.no_grad():
        model(_x(1, 64))
        for h in hooks:
            h.remove()
        assert order[-1] is model.classifier
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(b)
        out = model(_x(2, 64))["out"]
    # zero weights + bias b ⇒ logits == b at every pixel (bilinear upsampling preserves constants)
    torch.testing.assert_close(out, b.view(1, K, 1, 1).expand(2, K, 64, 64))


@pytest.mark.parametrize("name", ["deeplabv3_tiny", "denseaspp_tiny", "danet_tiny", "danet_mobilenet_v3_large"])
def test_classifier_features(name):
    torch.manual_seed(0)
    model = models.create(name, K).eval()
    x = _x(2, 64)
    with torch.no_grad():
        feats, logits = models.classifier_features(model, x)
        direct = model(x)["out"]
        # independent: apply the 1×1 conv by hand (einsum) and upsample
        w = model.classifier.weight[:, :, 0, 0]
        manual = torch.einsum("kc,nchw->nkhw", w, feats) + model.classifier.bias.view(1, -1, 1, 1)
        manual = F.interpolate(manual, size=(64, 64), mode="bilinear", align_corners=False)
    assert feats.dim() == 4 and feats.shape[:2] == (2, model.classifier.in_channels)
    assert feats.shape[2] < 64  # features live at the backbone's output stride
    assert logits.shape == (2, K, 64, 64)
    torch.testing.assert_close(logits, direct)
    torch.testing.assert_close(manual, logits, rtol=1e-4, atol=1e-4)
    # the hook is removed afterwards
    assert not model.classifier._forward_hooks


def test_classifier_features_follows_grad_mode():
    model = models.create("deeplabv3_tiny", K).eval()
    feats, logits = models.classifier_features(model, _x(1, 32))
    assert feats.requires_grad and logits.requires_grad
    with torch.no_grad():
        feats, _ = models.classifier_features(model, _x(1, 32))
    assert not feats.requires_grad


def test_same_seed_same_init_different_seed_different_init():
    def weights(seed):
        torch.manual_seed(seed)
        return models.create("danet_tiny", K, aux_loss=True).state_dict()

    a, b, c = weights(3), weights(3), weights(4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_global_context_line_at_top_changes_bottom_logits():
    """A 2-px line at the top must be able to influence the prediction at the bottom (global context)."""
    for head in HEADS:
        torch.manual_seed(0)
        model = models.create(f"{head}_tiny", K).eval()
        if head == "danet":
            with torch.no_grad():
                model.head.pam.gamma.fill_(1.0)  # at init the attention is an identity by design
        x = _x(1, 64)
        xt = x.clone()
        xt[:, :, :2] = 0
        with torch.no_grad():
            d = (model(x)["out"] - model(xt)["out"])[0, :, -8:].abs().max()
        assert d > 1e-6, head


# ------------------------------------------------------------------------------------------ names
def test_unknown_name_rejected_with_suggestion():
    with pytest.raises(models.UnknownModelError) as e:
        models.create("deeplab_tiny", K)
    msg = str(e.value)
    assert "'deeplabv3_tiny'" in msg and "danet_resnet50" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="unknown model 'zzz'"):
        models.create("zzz", K)
    with pytest.raises(ValueError, match="unknown model"):
        models.create("deeplabv3_", K)


def test_bad_num_classes_rejected():
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_classes"):
            models.create("deeplabv3_tiny", bad)


# ------------------------------------------------------------------------------------------ weights
def test_safetensors_backbone_loads(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = models.create("deeplabv3_tiny", K)
    state = {k: v.contiguous() for k, v in src.backbone.state_dict().items()}
    path = tmp_path / "bb.safetensors"
    save_file(state, str(path))
    torch.manual_seed(2)
    dst = models.create("danet_tiny", 3, backbone_weights=path)
    for k, v in state.items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k
    # a torchvision-style file with an ImageNet classifier ("fc.*") is accepted too; the classifier is ignored
    save_file({**state, "fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, str(tmp_path / "full.safetensors"))
    full = models.create("deeplabv3_tiny", K, backbone_weights=str(tmp_path / "full.safetensors"))
    assert torch.equal(full.backbone.state_dict()["stem.0.0.weight"], state["stem.0.0.weight"])


def test_safetensors_torchvision_names_for_resnet18(tmp_path):
    """A plain torchvision resnet18 state dict (with fc) loads into the dilated backbone."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(5)
    tv = torchvision.models.resnet18()
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model = models.create("deeplabv3_resnet18", K, backbone_weights=tmp_path / "r18.safetensors")
    assert torch.equal(model.backbone.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    assert model.backbone.layer4[1].conv2.dilation == (4, 4)


def test_wrong_safetensors_keys_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"nope": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="does not match this backbone"):
        models.create("deeplabv3_tiny", K, backbone_weights=tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        models.create("deeplabv3_tiny", K, backbone_weights=tmp_path / "missing.safetensors")


class _Evil:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("filename", ["evil.pt", "evil.pth", "evil.safetensors", "evil.bin"])
def test_pickle_backbone_file_refused_without_executing(tmp_path, filename):
    marker = tmp_path / "marker"
    path = tmp_path / filename
    path.write_bytes(pickle.dumps({"conv1.weight": _Evil(str(marker))}))
    assert not marker.exists()
    with pytest.raises(ValueError) as e:
        models.create("deeplabv3_tiny", K, backbone_weights=path)
    assert "safetensors" in str(e.value)
    assert not marker.exists()
    # sanity check of the probe itself: unpickling it really would create the marker
    if filename == "evil.pt":
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_imagenet_weights_need_local_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="not in the local torch hub cache") as e:
        models.create("deeplabv3_resnet18", K, backbone_weights="imagenet")
    assert "resnet18" in str(e.value) and ".safetensors" in str(e.value)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        models.create("deeplabv3_tiny", K, backbone_weights="imagenet")


def test_imagenet_weights_from_cache_are_used_without_unpickling(tmp_path, monkeypatch):
    """A cached torchvision checkpoint is loaded with weights_only=True; a booby-trapped one is refused."""
    import torchvision

    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    ckpt = tmp_path / "hub" / "checkpoints" / os.path.basename(enum.url)
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(9)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), ckpt)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    model = models.create("danet_resnet18", K, backbone_weights="imagenet")
    assert torch.equal(model.backbone.conv1.weight, tv.conv1.weight)
    assert torch.equal(model.backbone.layer3[0].conv1.weight, tv.layer3[0].conv1.weight)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"conv1.weight": Evil()}, ckpt)
    with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
        models.create("danet_resnet18", K, backbone_weights="imagenet")
    assert not marker.exists()