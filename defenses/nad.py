"""Neural Attention Distillation (NAD; Li et al., ICLR 2021) adapted to segmentation.

1. Teacher: a copy of the suspicious model fine-tuned on the clean subset for ``teacher_epochs`` (per-pixel
   cross-entropy, SGD at a constant learning rate: BackdoorBench's ``CosineAnnealingLR(T_max=100)`` moves it
   only from 0.01 to 0.0098 over its 10 teacher epochs; NAD fine-tunes its teacher with its own step schedule,
   which never anneals to zero).
2. Student: the suspicious model trained for ``epochs`` on the clean subset with per-pixel cross-entropy
   plus, for each chosen feature map l, ``beta_l`` × AT(student_l, teacher_l), where the attention map of a
   feature map ``F [N,C,h,w]`` is ``A = sum_c |F_c|^p``, divided by its L2 norm over the h×w positions, and
   AT is the mean squared difference of the two maps (Zagoruyko & Komodakis' attention transfer, as NAD's
   and BackdoorBench's ``AT`` class).  The attention map is spatial, so it carries over to segmentation
   unchanged.
3. The student is the repaired model.

BatchNorm: both phases train in ``model.train()`` mode, BatchNorm on batch statistics (and updating its
running statistics), as NAD's and BackdoorBench's loops do (``bn="train"``; ft switches BN the same way,
``_repair.bn_mode``); ``bn="frozen"`` keeps the statistics fixed (eval-mode BN; with revision 2's constant teacher learning rate, so
not nad's behaviour before revision 2 as a whole).
Frozen BN is *not* harmless here: it makes the student loss about 5× sharper (top Hessian eigenvalue measured
on a CamVid model: 2 427 frozen, 478 in train mode), so at lr 0.01 the student diverges (AT loss and feature
norms grow, clean mIoU collapses; docs/defenses.md, "nad").  A batch of one image keeps BN frozen (train-mode BN
needs more than one value per channel, and ASPP's pooled branch has one).

Which feature maps: NAD distils the outputs of the three residual groups of its WRN-16-1 (``block1``-``block3``),
betas 500, 1000, 1000 from shallow to deep.  (BackdoorBench's PreAct-ResNet-18 branch slices ``children()`` and
so taps ``layer3``, ``layer4`` and the 1×1 average pool, whose normalised attention map is identically 1: its
third term is 0.)  Here ``layers`` names modules (dotted names of ``model.named_modules()``); by default the
outputs of the last three **stages** of ``model.backbone`` (descending into a lone container such as
torchvision's ``features``): its direct children with a 4-D output (for a container the backbone runs piece by
piece, such as timm's ``blocks``, which never outputs anything itself: that container's children), grouped into
stages by the number that ends their name after a non-digit (``layer3``; ``patch_embed3``, ``block3``, ``norm3``;
``blocks.3``), a stage's output being its member that runs last; names without such a number (``stem``,
``relu``; torchvision's ``0``, ``1``, ...) are each a stage of their own.  So the tiny backbone's
``layer1``-``layer3``, a ResNet's ``layer2``-``layer4`` and a MiT encoder's (SegFormer) ``norm2``-``norm4`` — NAD's
choice of the last three residual groups; timm's MobileNetV3 gets ``blocks.4``-``blocks.6`` (the last a 1×1 conv,
not a group) and torchvision's MobileNets their last three numbered ``features`` (blocks of their last stage): an
approximation, pass ``layers`` for those.  (Revision 2 took the last three 4-D children: the same on the tiny CNNs,
ResNets and torchvision MobileNets, but on a MiT encoder ``patch_embed4``, ``block4`` and ``norm4``, three views of
its last stage, which collapsed the 12 SegFormers of the architecture zoo to mIoU-B 18.9 ± 4.9 against 75.0 ± 1.1
with the stage outputs (docs/defenses.md); on timm's MobileNetV3 its stem; on DenseNet-121 one layer.)  The maps are read with forward hooks, so any model
works.  A backbone may name its stages' outputs itself (``stage_ends``): DenseNet-121's ``features.transition2``,
``features.transition3`` and ``features.norm5``, where the names alone would make ``denseblock4`` and ``norm5`` two
stages.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from testbed.defenses._features import Budget, CostMeter, cross_entropy, report
from testbed.defenses._repair import (SGDPlan, bn_mode, bn_used, check, check_bn, check_clean, check_sgd, is_int,
                                      is_num, miou, probe, train_clean)
from testbed.defenses.protocol import DefenseContext, DefenseResult


def attention_map(fm: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """``sum_c |F_c|^p`` per position, divided by its L2 norm over the positions: ``[N,1,h,w]``."""
    am = fm.abs().pow(p).sum(1, keepdim=True)
    return am / (torch.linalg.vector_norm(am, dim=(2, 3), keepdim=True) + eps)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    """Attention-transfer loss: mean squared difference of the two attention maps."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


def default_layers(model: nn.Module, image_size: tuple[int, int], device: torch.device) -> list[str]:
    """The outputs of the last three stages of ``model.backbone`` (or of its lone child): see the module's text."""
    root, prefix = getattr(model, "backbone", None), "backbone"
    if root is None:
        raise ValueError("nad needs `layers` for a model without a `backbone` attribute (module names to distil)")
    if getattr(root, "stage_ends", None):  # a backbone that names its stages' outputs (DenseNet-121)
        return [f"{prefix}.{n}" for n in root.stage_ends[-3:]]
    children = list(root.named_children())
    while len(children) == 1:
        prefix, root = f"{prefix}.{children[0][0]}", children[0][1]
        children = list(root.named_children())
    order, hooks = [], []

    def record(name):
        def hook(module, inputs, output):
            if torch.is_tensor(output) and output.dim() == 4:
                order.append(name)
        return hook

    for name, child in children:  # a child and its children: a container the backbone runs piece by piece
        hooks.append(child.register_forward_hook(record(name)))  # (timm's `blocks`) does not fire itself
        hooks += [c.register_forward_hook(record(f"{name}.{n}")) for n, c in child.named_children()]
    probe(model, hooks, image_size, device)
    fired = set(order)
    names = [n for n in dict.fromkeys(order) if "." not in n or n.split(".")[0] not in fired]
    return [f"{prefix}.{n}" for n in stage_outputs(names)[-3:]]


def stage_outputs(names: list[str]) -> list[str]:
    """Of children ``names`` in execution order, each stage's last (a stage: the names ending in one number after a
    non-digit, ``block3``/``norm3``; any other name is a stage of its own), in the order the stages end."""
    last: dict[str, str] = {}
    for name in names:
        m = re.fullmatch(r"(?:.*\D)(\d+)", name)
        stage = f"#{m.group(1)}" if m else name
        last.pop(stage, None)  # re-inserted: dict order = the order in which the stages' outputs come
        last[stage] = name
    return list(last.values())


class Taps:
    """Forward hooks that keep the latest output of the named modules (in the order given)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"layers: no module named {missing[0]!r} in the model")
        self.out: dict[str, torch.Tensor] = {}
        self.names = names
        self.hooks = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name):
        def hook(module, inputs, output):
            self.out[name] = output
        return hook

    def maps(self) -> list[torch.Tensor]:
        return [self.out[n] for n in self.names]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@dataclass(eq=False)
class NAD:
    """Neural Attention Distillation: fine-tune a teacher on the clean subset, then distil its attention maps.

    Parameters: ``teacher_epochs``/``epochs`` (NAD and BackdoorBench: 10 each), ``betas`` (per layer, shallow
    to deep: 500, 1000, 1000), ``p`` (attention power, 2), ``layers`` (module names; None = the backbone's
    last three stages), ``lr``/``batch_size``/``momentum``/``weight_decay`` (0.01, 8, 0.9, 1e-4), ``bn``
    ("train": BatchNorm in training mode in both phases, as the references; "frozen": statistics fixed).
    """

    name = "nad"
    # 2: BatchNorm in training mode and a constant teacher learning rate, as the references (was: frozen BN,
    # cosine-annealed teacher; a bench's pairs of revision 1 are run again). 3: default taps are stage outputs
    # (unchanged on the tiny CNNs, ResNets and torchvision MobileNets; MiT norm2-norm4, was patch_embed4, block4,
    # norm4; timm MobileNetV3 blocks.4-6, was its stem; DenseNet-121 transition2/3 and norm5, was one layer)
    revision = 3
    paper = 'Li et al.: Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks, ICLR 2021'
    reference = 'github.com/SCLBD/BackdoorBench defense/nad.py'
    uses_training_set = False
    params_doc = {
        "teacher_epochs": "epochs fine-tuning the teacher on the clean subset (NAD: 10)",
        "epochs": "epochs training the student with CE + attention distillation (NAD: 10)",
        "betas": "AT-loss weight per distilled layer, shallow to deep (NAD: 500, 1000, 1000)",
        "p": "power of the attention map sum_c |F_c|^p (NAD: 2)",
        "layers": "module names whose outputs are distilled; None = the last three stages of model.backbone",
        "lr": "SGD learning rate, constant in both phases (BackdoorBench: 0.01)",
        "batch_size": "clean images per SGD step",
        "momentum": "SGD momentum (0.9)",
        "weight_decay": "SGD weight decay (NAD: 1e-4)",
        "bn": "BatchNorm while training: train (batch statistics, as NAD and BackdoorBench) or frozen",
    }

    # the parameters, stored as given (the dataclass writes the plain storing ``__init__``); checked in check_params
    teacher_epochs: int = 10
    epochs: int = 10
    betas: tuple = (500.0, 1000.0, 1000.0)
    p: float = 2.0
    layers: list | None = None
    lr: float = 0.01
    batch_size: int = 8
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bn: str = "train"

    def check_params(self) -> None:
        check_sgd(self)
        check(is_int(self.teacher_epochs), "teacher_epochs", "an integer >= 0", self.teacher_epochs)
        check(is_num(self.p) and self.p > 0, "p", "a number > 0", self.p)
        check_bn(self)
        betas = self.betas
        check(isinstance(betas, (list, tuple)) and len(betas) > 0 and all(is_num(b) and b >= 0 for b in betas),
              "betas", "a non-empty list of numbers >= 0", betas)
        layers = self.layers
        check(layers is None or isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers)
              and len(layers) == len(betas), "layers", f"None or a list of {len(betas)} module names (one per beta)",
              layers)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        self.check_params()
        check_clean(ctx, self.name)
        meter = CostMeter()
        budget = Budget.for_context(ctx, meter)
        student = copy.deepcopy(model).to(ctx.device).eval()
        size = tuple(ctx.clean_images.shape[1:3])
        layers = list(self.layers) if self.layers is not None else default_layers(student, size, ctx.device)
        check(len(layers) == len(self.betas), "betas", f"one weight per distilled layer ({', '.join(layers)})",
              self.betas)
        start = miou(student, ctx, meter)
        teacher = copy.deepcopy(student)
        ce = lambda m, x, y: (cross_entropy(m(x)["out"], y, ctx.ignore_index), len(x), len(x))  # noqa: E731
        plan = SGDPlan(self.teacher_epochs, self.lr, self.batch_size, self.momentum, self.weight_decay,
                       "constant", "teacher", (0.0, 0.5))
        teacher_done, stopped = train_clean(teacher, ctx, plan, bn_mode(self.bn, ce), budget, meter)
        teacher.eval().requires_grad_(False)
        teacher_miou = miou(teacher, ctx, meter)
        student_done = 0
        if not stopped:
            student_done = self._distil(student, teacher, layers, ctx, budget, meter)
        final = miou(student, ctx, meter)
        report(ctx.progress, 1.0, f"nad done: clean mIoU {final:.3f}")
        details = {"layers": layers, "betas": [float(b) for b in self.betas], "p": float(self.p),
                   "bn": self.bn,
                   "bn_used": bn_used(self.bn, self.batch_size, len(ctx.clean_images)),
                   "teacher_epochs_done": teacher_done, "epochs_done": student_done, "miou_clean_start": start,
                   "miou_clean_teacher": teacher_miou, "miou_clean_final": final, **budget.summary()}
        return DefenseResult(model=student, cost=meter.cost(), details=details)

    def _distil(self, student, teacher, layers, ctx, budget, meter) -> int:
        """The student phase: per-pixel CE + sum of beta_l × AT over the tapped layers (teacher detached)."""
        s_taps, t_taps = Taps(student, layers), Taps(teacher, layers)

        def loss_fn(m, x, y):
            logits = m(x)["out"]
            with torch.no_grad():
                teacher(x)
            loss = cross_entropy(logits, y, ctx.ignore_index)
            for beta, fs, ft in zip(self.betas, s_taps.maps(), t_taps.maps()):
                loss = loss + float(beta) * at_loss(fs, ft.detach(), float(self.p))
            return loss, 2 * len(x), len(x)  # student and teacher forwards, student backward

        # BackdoorBench's adjust_learning_rate: the given lr for 2 epochs, then 0.01 (0.01 throughout at lr=0.01)
        plan = SGDPlan(self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay, "constant",
                       "student", (0.5, 1.0))
        try:
            done, _ = train_clean(student, ctx, plan, bn_mode(self.bn, loss_fn), budget, meter, passes_per_image=3)
        finally:
            s_taps.remove()
            t_taps.remove()
        return done
