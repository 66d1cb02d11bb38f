"""The demo's settings: what `testbed demo` trains and defends (the paper's Tables 1–2 on synthetic data), the
targets it checks, and the zoo spec it writes (``OUT/work/zoo.toml``, rerunnable with `testbed zoo build`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from testbed import models
from testbed.core.errors import UserError, did_you_mean
from testbed.defenses.registry import load_defense, parse_params
from testbed.zoo.spec import parse_spec

ALL_KEYS = ("mIoU-B-all", "PA-B-all")  # beside scoring.SCORE_KEYS: the whole clean test set (the paper's Benign rows)
# The three kinds of defense on one attacked model: a repair, a trigger-synthesis cost analysis and an
# input filter.  Trigger synthesis at Neural Cleanse's budget costs about 830 CPU-seconds on this model (all 11
# candidates; docs/defenses.md), past the demo's 5 minutes on 2 cores, so the demo runs its first candidate only:
# the measured cost of one candidate and its projection to every image-level target, every (source, target) pair
# and ADE20K's size — the seed paper's argument.  A partial search is never called clean (its verdict is
# "inconclusive"); `--param trigger-synthesis.max_candidates=null` runs the full search.  The training-set
# defenses retrain a model each: opt in with --defenses (docs/results.md has every defense over three seeds).
DEFAULT_DEFENSES = ("strip", "trigger-synthesis", "fine-pruning")  # the longest first: on 2 workers they end together
DEFAULT_PARAMS = ("trigger-synthesis.max_candidates=1",)
COST_ONLY_NOTE = ("Trigger synthesis ran as a **cost analysis**: its first candidate only (the demo's default "
                  "`--param trigger-synthesis.max_candidates=1`), so its verdict is *inconclusive* by design; the "
                  "table above projects the measured cost to the whole search. `--param "
                  "trigger-synthesis.max_candidates=null` runs all candidates (about 14 CPU-minutes on this model). "
                  "The training-set defenses (a retrain each) are opt-in: e.g. `--defenses "
                  "strip,trigger-synthesis,fine-pruning,activation-clustering`; every defense over three seeds: "
                  "docs/results.md, as its benchmark runs finish.")
OPT_IN_NOTE = ("Trigger synthesis (its cost analysis) was not run: add it with `--defenses "
               "strip,trigger-synthesis,fine-pruning`; the training-set defenses (a retrain each) with e.g. "
               "`--defenses activation-clustering,abl`; every defense over three seeds: docs/results.md, as its "
               "benchmark runs finish.")
LAYOUT = 2  # work/ layout: 2 = a zoo under work/zoo (1 was work/data + work/runs)


@dataclass(frozen=True)
class Setting:
    """One poisoned training set of the paper's tables."""

    name: str  # zoo attack id, e.g. "fgba-n-to-1-line"
    attack: str  # results.json "attack": badnets | fgba-n-to-1 | fgba-1-to-1
    trigger: str  # "line" | "semantic:CLASS"
    flags: dict  # attacks.poison_file keyword arguments (mirror `testbed poison` and a zoo [[attack]] table)
    paper_rate: str  # the paper's poisoning rate (or rule) for this setting, for the report


# The paper's setting (§3.1): line trigger, semantic 'wall' for FGBA and 'grass' for BadNets, N-to-1 → wall
# at 10%, 1-to-1 person → palm at ≈20%, BadNets at 10% with a road-scape target; with the semantic trigger the
# fine-grained attacks poison "all samples containing both 'wall' and 'person'" (require = person).
SETTINGS = (
    Setting("badnets-line", "badnets", "line", dict(attack="badnets", trigger="line", rate=0.1),
            "not stated (10% here)"),
    Setting("badnets-semantic", "badnets", "semantic:grass", dict(attack="badnets", trigger="semantic:grass"),
            "≈10% (images with grass)"),
    Setting("fgba-n-to-1-line", "fgba-n-to-1", "line",
            dict(attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=0.1), "10%"),
    Setting("fgba-n-to-1-semantic", "fgba-n-to-1", "semantic:wall",
            dict(attack="fgba", preset="n-to-1", target="wall", trigger="semantic:wall", require="person"),
            "10% (images with wall and person)"),
    Setting("fgba-1-to-1-line", "fgba-1-to-1", "line",
            dict(attack="fgba", preset="1-to-1", source="person", target="palm", trigger="line", rate=0.2), "≈20%"),
    Setting("fgba-1-to-1-semantic", "fgba-1-to-1", "semantic:wall",
            dict(attack="fgba", preset="1-to-1", source="person", target="palm", trigger="semantic:wall",
                 require="person"), "≈20% (images with wall and person)"),
)
BENIGN = "benign"

# Targets (percent) from the paper's Tables 1–2: (attack, trigger kind) → minimum ASR.
ASR_TARGETS = {("fgba-n-to-1", "line"): 95.0, ("fgba-1-to-1", "line"): 75.0, ("badnets", "line"): 90.0}
BENIGN_MAX_ASR = 15.0
MAX_MIOU_DROP = 2.0


@dataclass
class DemoConfig:
    out: Path = Path("demo-out")
    n_train: int = 1000
    n_test: int = 200
    size: int = 64
    model: str = "deeplabv3_tiny"
    epochs: int = 11
    batch_size: int = 8  # more steps per epoch than 16 at the same cost on 1 thread: FGBA 1-to-1 needs the steps
    seed: int = 0
    device: str = "auto"
    defenses: Sequence[str] = DEFAULT_DEFENSES
    params: dict = field(default_factory=dict)  # defense name -> {parameter: value} (parsed --param)
    defend_setting: str = "fgba-n-to-1-line"
    budget_s: float | None = None  # a wall-clock budget makes results depend on the machine's load: none by default
    budget_passes: int | None = None
    workers: int | str = "auto"  # parallel models/defenses; does not change any number
    threads: int = 1  # torch threads per model and defense; changes the bytes, so it is part of the cache key
    train_overrides: dict = field(default_factory=dict)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def zoo_spec(cfg: DemoConfig) -> str:
    """The demo as a zoo spec: one model, the benign set and the six poisoned ones, one seed."""
    lines = ["# Written by `testbed demo`; `testbed zoo build THIS --out ZOO/` builds the same models.",
             "[data]",
             f"synth = {{ n_train = {cfg.n_train}, n_test = {cfg.n_test}, size = {cfg.size}, seed = {cfg.seed} }}",
             "[train]", f"epochs = {cfg.epochs}", f"batch_size = {cfg.batch_size}"]
    lines += [f"{k} = {_toml(v)}" for k, v in sorted(cfg.train_overrides.items())]
    lines += ["", "[[attack]]", f'id = "{BENIGN}"']
    for s in SETTINGS:
        lines += ["", "[[attack]]", f'id = "{s.name}"'] + [f"{k} = {_toml(v)}" for k, v in s.flags.items()]
    # the defended model first: with 2 workers its defenses can start while the last model trains
    order = sorted([BENIGN] + [s.name for s in SETTINGS], key=lambda a: a != cfg.defend_setting)
    lines += ["", "[grid]", f"model = [{_toml(cfg.model)}]", f"attack = {_toml(order)}", f"seed = [{cfg.seed}]", ""]
    return "\n".join(lines)


def defense_params(defenses: Sequence[str], items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--param`` items → ``{defense: {key: value}}`` over the demo's defaults (:data:`DEFAULT_PARAMS`, for the
    defenses that run): a user's value replaces the default of the same key."""
    defaults = [d for d in DEFAULT_PARAMS if d.split(".", 1)[0] in defenses]
    if not defenses and items:
        raise UserError(f"--param {items[0]!r}: no defense runs (--defenses '')")
    base = parse_params(defaults, list(defenses))
    user = parse_params(list(items), list(defenses), names_flag="--defenses")
    return {name: {**base[name], **user[name]} for name in defenses if base[name] or user[name]}


def check_settings(cfg: DemoConfig) -> None:
    """Every setting checked (by the zoo's own spec validation) before anything is written."""
    if cfg.model not in models.available():
        raise UserError(f"--model {cfg.model!r} is not a model{did_you_mean(cfg.model, models.available())}; "
                        "docs/models.md lists them")
    try:
        parse_spec(Path("demo"), text=zoo_spec(cfg))
    except UserError as e:
        raise UserError(f"these demo settings cannot run: {str(e).removeprefix('demo: ')}") from None

    for name in cfg.defenses:  # a misspelt defense or parameter fails now, not after seven models have trained
        try:
            load_defense(name, **cfg.params.get(name, {}))
        except UserError as e:
            raise UserError(f"{'--param' if cfg.params.get(name) else '--defenses'}: {e}") from None
