"""Channel Lipschitzness-based Pruning (CLP; Zheng et al., ECCV 2022): data-free backdoor removal.

For every convolution whose output goes straight into a BatchNorm, each output channel k gets an upper bound
of its Lipschitz constant (UCLC): the largest singular value of the conv kernel ``W_k`` (reshaped to
``[C_in, kh*kw]``) times ``|gamma_k / sigma_k|`` of the BatchNorm (``sigma_k`` = sqrt of the running
variance, without BN's epsilon, as BackdoorBench's ``defense/clp.py``).  Within each layer, channels with
UCLC > mean + ``u`` × std (unbiased std over the layer's channels) are pruned: their BatchNorm weight and
bias are set to 0, so the channel outputs 0 before the activation.

Which conv feeds which BatchNorm is read from one forward pass of a zero image (data-free: no clean image
is used): a BatchNorm is paired with the conv whose output tensor it receives.  The reference pairs each BN
with the conv registered just before it, which mis-pairs pre-activation blocks (BN → ReLU → conv, as in
DenseASPP); a BatchNorm fed by anything but a conv is skipped and listed in ``details``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from testbed.defenses._features import Budget, CostMeter, report
from testbed.defenses._repair import check, is_num, probe
from testbed.defenses.protocol import DefenseContext, DefenseResult


def conv_bn_pairs(model: nn.Module, image_size: tuple[int, int], device: torch.device) -> tuple[list, list[str]]:
    """``[(bn name, conv, bn)]`` where the BatchNorm's input is the conv's output, and the unpaired BN names.

    Found by forward hooks during one pass of a zero image of ``image_size`` (eval mode, no gradients).
    """
    produced: dict[int, tuple[torch.Tensor, nn.Conv2d]] = {}  # the tensor is kept so its id is not reused
    pairs, unpaired, hooks = [], [], []

    def on_conv(module, inputs, output):
        produced[id(output)] = (output, module)

    def on_bn(name):
        def hook(module, inputs):
            out, conv = produced.get(id(inputs[0]), (None, None))
            if out is inputs[0]:
                pairs.append((name, conv, module))
            else:
                unpaired.append(name)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(on_bn(name)))
    probe(model, hooks, image_size, device)
    seen, unique = set(), []
    for name, conv, bn in pairs:  # a module called twice is analysed once
        if name not in seen:
            seen.add(name)
            unique.append((name, conv, bn))
    return unique, sorted(set(unpaired) - seen)


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC ``[C_out]``: spectral norm of each output channel's kernel ``[C_in/groups, kh*kw]`` × |gamma/sigma|."""
    w = conv.weight.detach().double()
    kernels = w.reshape(w.shape[0], w.shape[1], -1)  # [C_out, C_in/groups, kh*kw]
    sigma = torch.linalg.matrix_norm(kernels, ord=2)  # largest singular value per channel
    scale = (bn.weight.detach().double() / bn.running_var.detach().double().sqrt()).abs()
    return sigma * scale


class CLP:
    """Channel Lipschitzness-based Pruning: data-free; prunes channels with an outlying Lipschitz upper bound.

    Parameters: ``u`` (a channel is pruned when its UCLC > mean + u × std of its layer; Zheng et al.: 3).
    """

    name = "clp"
    paper = 'Zheng et al.: Data-Free Backdoor Removal Based on Channel Lipschitzness, ECCV 2022'
    reference = 'github.com/SCLBD/BackdoorBench defense/clp.py'
    uses_training_set = False
    params_doc = {"u": "prune a channel when its Lipschitz upper bound > mean + u x std of its layer (paper: 3)"}

    def __init__(self, u: float = 3.0) -> None:
        self.u = u

    def check_params(self) -> None:
        check(is_num(self.u), "u", "a finite number", self.u)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        self.check_params()
        meter = CostMeter()
        budget = Budget.for_context(ctx, meter)
        model = copy.deepcopy(model).to(ctx.device).eval()
        size = tuple(ctx.image_size) if all(ctx.image_size) else tuple(ctx.clean_images.shape[1:3])
        if budget.spent(1):  # the pairing forward pass is the only model evaluation
            return DefenseResult(model=model, cost=meter.cost(), details={"layers": {}, **budget.summary()})
        pairs, unpaired = conv_bn_pairs(model, size, ctx.device)
        meter.forward += 1
        layers, total, pruned_total = {}, 0, 0
        for i, (name, conv, bn) in enumerate(pairs):
            uclc = channel_lipschitz(conv, bn)
            std = uclc.std() if len(uclc) > 1 else torch.zeros((), dtype=uclc.dtype)
            cut = torch.nonzero(uclc > uclc.mean() + self.u * std).flatten()
            with torch.no_grad():
                bn.weight[cut] = 0
                bn.bias[cut] = 0
            layers[name] = {"channels": int(len(uclc)), "pruned": [int(c) for c in cut],
                            "uclc_mean": float(uclc.mean()), "uclc_std": float(std)}
            total, pruned_total = total + len(uclc), pruned_total + len(cut)
            report(ctx.progress, (i + 1) / len(pairs), f"clp {name}: {len(cut)}/{len(uclc)} channels pruned")
        report(ctx.progress, 1.0, f"clp done: {pruned_total}/{total} channels pruned")
        details = {"u": float(self.u), "layers": layers, "channels": total, "pruned": pruned_total,
                   "pruned_fraction": pruned_total / total if total else 0.0, "unpaired_batchnorms": unpaired,
                   **budget.summary()}
        return DefenseResult(model=model, cost=meter.cost(), details=details)
