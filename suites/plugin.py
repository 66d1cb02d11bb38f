"""pytest plugin: options, fixtures and per-entry parametrization for robustness suites.

Every fixture is inert unless ``--zoo`` is given, so installing segbackdoor never changes an unrelated
pytest run.  A defense's result on an entry is computed once per session and shared by all criteria.
Parameters are parsed by the same function as `testbed defend --param` (one syntax everywhere), and bad
options are one-line usage errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.core.seeds import seed_arg
from testbed.stats.rows import defense_label


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("segbackdoor", "segbackdoor robustness suites")
    g.addoption("--defense", default=None, help="defense under test: a built-in name or package.module:Class")
    g.addoption("--zoo", default=None, help="model zoo directory (from `testbed zoo build`)")
    g.addoption("--public-key", default=None, metavar="PUB",
                help="the zoo publisher's public key (PEM): refuse the zoo unless its manifest is signed by it")
    g.addoption("--defense-param", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                help="a parameter for the defense's constructor, as `testbed defend --param`: KEY=VALUE or "
                "NAME.KEY=VALUE (repeatable; values parsed as JSON when possible)")
    g.addoption("--max-asr", type=float, default=20.0, help="repair/retrain/filter: max ASR (%%) after the defense (default 20)")
    g.addoption("--max-miou-drop", type=float, default=3.0,
                help="repair/retrain/filter: max mIoU-B drop (points) caused by the defense (default 3)")
    g.addoption("--min-tpr", type=float, default=0.8, help="filter: min share of attacked test inputs rejected (default 0.8)")
    g.addoption("--max-fpr", type=float, default=0.1, help="filter: max share of benign test inputs rejected (default 0.1)")
    g.addoption("--min-detection-accuracy", type=float, default=None,
                help="verdict: min accuracy of the verdicts over the whole zoo (default: not tested)")
    g.addoption("--min-detection-auroc", type=float, default=None,
                help="verdict: min AUROC of the verdict scores, benign vs backdoored entries (default: not tested)")
    g.addoption("--min-asr", type=float, default=50.0,
                help="entries whose attack did not implant (ASR before the defense below this, %%) skip the criteria "
                "that need a backdoor (default 50)")
    g.addoption("--budget", type=float, default=None, help="seconds the defense may take per model (default: unlimited)")
    g.addoption("--budget-passes", type=int, default=None,
                help="forward + backward passes the defense may make per model, handed to it (default: unlimited)")
    g.addoption("--suite-device", default="cpu", help="device for defenses and scoring (default cpu)")
    g.addoption("--suite-seed", type=seed_arg, default=0, help="seed handed to the defense (default 0)")


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


def _settings(config: pytest.Config) -> SuiteSettings | None:
    """The suite's settings, validated once (at configure) and kept on ``config``: every later caller gets the same
    object, and a bad option never reaches a test."""
    if not hasattr(config, "_segbackdoor_settings"):
        config._segbackdoor_settings = _validated(config)
    return config._segbackdoor_settings


def _validated(config: pytest.Config) -> SuiteSettings | None:
    from testbed.evaluation.attack_check import check_min_asr
    from testbed.bench.run import check_budgets
    from testbed.defenses.registry import load_defense, parse_params
    from testbed.core.errors import UserError

    zoo = config.getoption("--zoo")
    if zoo is None:
        return None
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


@pytest.hookimpl(tryfirst=True)  # before junitxml reads --junitprefix
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "benign_only: run only on benign zoo entries")
    config.addinivalue_line("markers", "backdoored_only: run only on backdoored zoo entries")
    config._segbackdoor_cache = {}  # (entry id, run number) -> result row
    settings = _settings(config)  # bad options are one usage error before collection, not an error of every test
    if settings is not None:
        config._segbackdoor_zoo = _open_zoo(settings)  # so is a missing or tampered zoo (verified once, then cached)
        if not getattr(config.option, "junitprefix", None) and hasattr(config.option, "junitprefix"):
            config.option.junitprefix = f"segbackdoor.{settings.label}"  # JUnit classnames carry the defense
        _show_suite_ids_as_they_are(config)


def _show_suite_ids_as_they_are(config: pytest.Config) -> None:
    """Under ``--pyargs`` the suite's node ids are relative to the installed package, not to the rootdir, so
    pytest's "relative to where you ran it" rewriting turns them into a path that does not exist
    (``../test_robustness.py``); such ids are shown unchanged (``test_robustness.py::test_asr[...]``)."""
    relative = config.cwd_relative_nodeid

    def shown(nodeid: Any) -> Any:
        path = getattr(nodeid, "path", None)
        path = str(nodeid).split("::")[0] if path is None else str(path)
        return nodeid if path and not (config.rootpath / path).exists() else relative(nodeid)

    config.cwd_relative_nodeid = shown  # type: ignore[method-assign]


def _open_zoo(settings: SuiteSettings):
    from testbed.core.errors import UserError
    from testbed.zoo import open as open_zoo

    try:
        zoo = open_zoo(settings.zoo, public_key=settings.public_key)
        list(zoo)  # handing out the entries verifies their files (cached): tampering is a usage error here
        return zoo
    except UserError as e:
        raise pytest.UsageError(f"--zoo {settings.zoo}: {e}") from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "zoo_entry" not in metafunc.fixturenames:
        return
    settings = _settings(metafunc.config)
    if settings is None:
        metafunc.parametrize("zoo_entry", [pytest.param(None, marks=pytest.mark.skip(reason="no --zoo given"))],
                             ids=["no-zoo"])
        return
    entries = list(metafunc.config._segbackdoor_zoo)
    if metafunc.definition.get_closest_marker("benign_only"):
        entries = [e for e in entries if e.is_benign]
    if metafunc.definition.get_closest_marker("backdoored_only"):
        entries = [e for e in entries if not e.is_benign]
    if not entries:
        metafunc.parametrize("zoo_entry", [pytest.param(None, marks=pytest.mark.skip(reason="no matching zoo entry"))],
                             ids=["none"])
        return
    metafunc.parametrize("zoo_entry", entries, ids=[f"{settings.label}:{e.id}" for e in entries])  # ids carry the defense


@pytest.fixture(scope="session")
def suite_settings(pytestconfig) -> SuiteSettings:
    s = _settings(pytestconfig)
    if s is None:
        pytest.skip("no --zoo given")
    return s


@pytest.fixture(scope="session")
def zoo(pytestconfig, suite_settings):
    """The zoo under test (``testbed.zoo.Zoo``)."""
    return pytestconfig._segbackdoor_zoo


@pytest.fixture(scope="session")
def defense(suite_settings):
    """A fresh instance of the defense under test, built with the --defense-param values."""
    from testbed.defenses.registry import load_defense
    from testbed.core.errors import UserError

    try:
        return load_defense(suite_settings.defense, **suite_settings.params)
    except UserError as e:
        raise pytest.UsageError(f"--defense {suite_settings.defense}: {e}") from None


def run_on_entry(entry: Any, settings: SuiteSettings) -> Any:
    """The defense's row on one zoo entry, with what a bench adds: the entry's truth, the failed-attack guard, and
    the attack's parameters (for the verdict's target)."""
    from testbed.evaluation.attack_check import attack_failure
    from testbed.core import progress
    from testbed.evaluation.runner import run_defense
    from testbed.defenses.registry import load_defense
    from testbed.core.errors import UserError

    try:
        d = load_defense(settings.defense, **settings.params)
    except UserError as e:
        raise pytest.UsageError(f"--defense {settings.defense}: {e}") from None
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
        from testbed.data.h5data import open_dataset

        with open_dataset(entry.data_path, check_labels=False) as f:
            row.attack_params = (f.attack or {}).get("params")
    return row


@pytest.fixture(scope="session")
def score(pytestconfig, suite_settings):
    """``score(entry, run=0) -> row``: the defense's before/after result on a zoo entry, computed once.

    ``run=1`` runs the defense a second time with the same seed (used by the determinism criterion).
    The row (a :class:`testbed.evaluation.rows.DefenseRow`) reads like the row `testbed bench` writes (keys
    ``before``, ``after``, ``cost``, ``error``, ``error_source``, ``attack_implanted``...).
    """
    cache = pytestconfig._segbackdoor_cache

    def _score(entry, run: int = 0) -> dict:
        key = (entry.id, run)
        if key not in cache:
            cache[key] = run_on_entry(entry, suite_settings)
        return cache[key]

    return _score
