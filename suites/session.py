"""What a suite run needs once ``--zoo`` is given: its settings checked, the zoo opened, the defense run per entry.

Why a module of its own, imported in one place only (:func:`testbed.suites.plugin.session`): the plugin is loaded
by every pytest run in an environment where segbackdoor is installed (the ``pytest11`` entry point), and what a
suite run needs brings torch, the defenses and the zoo (seconds to import).  `pytest --help` and unrelated test
runs never import this module; a suite run imports it once, when pytest starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.bench.run import check_budgets
from testbed.core import progress
from testbed.core.errors import UserError
from testbed.data.h5data import open_dataset
from testbed.defenses.registry import load_defense, parse_params
from testbed.evaluation.attack_check import attack_failure, check_min_asr
from testbed.evaluation.runner import run_defense
from testbed.stats.rows import defense_label
from testbed.zoo import open as open_zoo


@dataclass(repr=False)
class SuiteSettings:
    defense: str
    zoo: Path
    max_asr: float
    max_miou_drop: float
    min_tpr: float
    max_fpr: float
    min_accuracy: float | None
    min_auroc: float | None
    min_asr: float
    budget_s: float | None
    budget_passes: int | None
    params: dict
    device: str
    seed: int
    public_key: str | None = None  # the zoo publisher's public key: the zoo must be signed by it
    label: str = ""  # the defense's name and parameters, as a report names it (blur[sigma=0.5])

    def __repr__(self) -> str:  # what an assertion message shows: short, not every field
        return f"SuiteSettings({self.defense!r} on {str(self.zoo)!r})"


def validated(config: pytest.Config, zoo: str) -> SuiteSettings:
    """The options of a suite run, checked: a bad one is one :class:`pytest.UsageError` before any test."""
    defense = config.getoption("--defense")
    if not defense:
        raise pytest.UsageError("--zoo needs --defense NAME (a built-in like fine-pruning, or package.module:Class)")
    opt = config.getoption
    try:
        check_budgets(opt("--budget"), opt("--budget-passes"))
        check_min_asr(opt("--min-asr"), "--min-asr")
        for name in ("--min-tpr", "--max-fpr", "--min-detection-accuracy", "--min-detection-auroc"):
            v = opt(name)
            if v is not None and not 0 <= v <= 1:
                raise UserError(f"{name} is a fraction in [0, 1], got {v}")
        params = parse_params(opt("--defense-param"), [defense], flag="--defense-param")[defense]
        label = defense_label(load_defense(defense, **params).name, params)  # a bad name or parameter: here, once
    except UserError as e:
        text = str(e)
        raise pytest.UsageError(text if text.startswith("--") or defense in text else f"--defense {defense}: {text}") from None
    return SuiteSettings(
        defense=defense, zoo=Path(zoo), public_key=opt("--public-key"), max_asr=opt("--max-asr"), max_miou_drop=opt("--max-miou-drop"),
        min_tpr=opt("--min-tpr"), max_fpr=opt("--max-fpr"), min_accuracy=opt("--min-detection-accuracy"),
        min_auroc=opt("--min-detection-auroc"), min_asr=opt("--min-asr"), budget_s=opt("--budget"),
        budget_passes=opt("--budget-passes"), params=params, device=opt("--suite-device"), seed=opt("--suite-seed"),
        label=label,
    )


def open_suite_zoo(settings: SuiteSettings) -> Any:
    """The zoo under test, verified once (a missing or tampered zoo is a usage error, not a failure of every test)."""
    try:
        zoo = open_zoo(settings.zoo, public_key=settings.public_key)
        list(zoo)  # handing out the entries verifies their files (cached): tampering is a usage error here
        return zoo
    except UserError as e:
        raise pytest.UsageError(f"--zoo {settings.zoo}: {e}") from None


def new_defense(settings: SuiteSettings) -> Any:
    """A fresh instance of the defense under test, built with the --defense-param values."""
    try:
        return load_defense(settings.defense, **settings.params)
    except UserError as e:
        raise pytest.UsageError(f"--defense {settings.defense}: {e}") from None


def run_on_entry(entry: Any, settings: SuiteSettings) -> Any:
    """The defense's row on one zoo entry, with what a bench adds: the entry's truth, the failed-attack guard, and
    the attack's parameters (for the verdict's target)."""
    d = new_defense(settings)
    was_quiet = not progress.active()
    progress.set_quiet(True)  # a failure's captured stderr holds its message, not the scoring's progress lines
    try:
        row = run_defense(d, entry.run_dir, entry.data_path, device=settings.device, seed=settings.seed,
                          budget_s=settings.budget_s, budget_passes=settings.budget_passes, model_id=entry.id,
                          attack=entry.attack_id, random_control=False, panels=0)
    finally:
        progress.set_quiet(was_quiet)
    row.benign_model = bool(entry.is_benign)
    failed = attack_failure((row.before or {}).get("ASR"), row.benign_model, settings.min_asr)
    if not entry.is_benign and (row.before or {}).get("ASR") is not None:
        row.attack_implanted = failed is None
    if failed:
        row.notes.append(f"DER n/a: {failed}")
        row.der = None
    if not entry.is_benign:
        with open_dataset(entry.data_path, check_labels=False) as f:
            row.attack_params = (f.attack or {}).get("params")
    return row
