"""pytest plugin: options, fixtures and per-entry parametrization for robustness suites.

Every fixture is inert unless ``--zoo`` is given, so installing segbackdoor never changes an unrelated
pytest run.  A defense's result on an entry is computed once per session and shared by all criteria.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("segbackdoor", "segbackdoor robustness suites")
    g.addoption("--defense", default=None, help="defense under test: a built-in name or package.module:Class")
    g.addoption("--zoo", default=None, help="model zoo directory (from `testbed zoo build`)")
    g.addoption("--max-asr", type=float, default=20.0, help="max ASR (%%) after the defense (default 20)")
    g.addoption("--max-miou-drop", type=float, default=3.0, help="max mIoU-B drop (points) caused by the defense (default 3)")
    g.addoption("--budget", type=float, default=None, help="seconds the defense may take per model (default: unlimited)")
    g.addoption("--defense-param", action="append", default=[], metavar="KEY=VALUE",
                help="a parameter for the defense's constructor (repeatable; values parsed as JSON when possible)")
    g.addoption("--suite-device", default="cpu", help="device for defenses and scoring (default cpu)")
    g.addoption("--suite-seed", type=int, default=0, help="seed handed to the defense (default 0)")


def _param(text: str) -> tuple[str, Any]:
    from testbed.defenses.registry import parse_value

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise pytest.UsageError(f"--defense-param {text!r}: expected KEY=VALUE")
    return key, parse_value(value)


@dataclass
class SuiteSettings:
    defense: str
    zoo: Path
    max_asr: float
    max_miou_drop: float
    budget_s: float | None
    params: dict
    device: str
    seed: int


def _settings(config: pytest.Config) -> SuiteSettings | None:
    zoo = config.getoption("--zoo")
    if zoo is None:
        return None
    defense = config.getoption("--defense")
    if not defense:
        raise pytest.UsageError("--zoo needs --defense NAME (a built-in like fine-pruning, or package.module:Class)")
    return SuiteSettings(
        defense=defense, zoo=Path(zoo), max_asr=config.getoption("--max-asr"),
        max_miou_drop=config.getoption("--max-miou-drop"), budget_s=config.getoption("--budget"),
        params=dict(_param(p) for p in config.getoption("--defense-param")),
        device=config.getoption("--suite-device"), seed=config.getoption("--suite-seed"),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "benign_only: run only on benign zoo entries")
    config.addinivalue_line("markers", "backdoored_only: run only on backdoored zoo entries")
    config._segbackdoor_cache = {}  # (entry id, run number) -> result row


def _open_zoo(settings: SuiteSettings):
    from testbed.errors import UserError
    from testbed.zoo import open as open_zoo

    try:
        return open_zoo(settings.zoo)
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
    entries = list(_open_zoo(settings))
    if metafunc.definition.get_closest_marker("benign_only"):
        entries = [e for e in entries if e.is_benign]
    if metafunc.definition.get_closest_marker("backdoored_only"):
        entries = [e for e in entries if not e.is_benign]
    if not entries:
        metafunc.parametrize("zoo_entry", [pytest.param(None, marks=pytest.mark.skip(reason="no matching zoo entry"))],
                             ids=["none"])
        return
    metafunc.parametrize("zoo_entry", entries, ids=[e.id for e in entries])


@pytest.fixture(scope="session")
def suite_settings(pytestconfig) -> SuiteSettings:
    s = _settings(pytestconfig)
    if s is None:
        pytest.skip("no --zoo given")
    return s


@pytest.fixture(scope="session")
def zoo(suite_settings):
    """The zoo under test (``testbed.zoo.Zoo``)."""
    return _open_zoo(suite_settings)


@pytest.fixture(scope="session")
def defense(suite_settings):
    """A fresh instance of the defense under test, built with the --defense-param values."""
    from testbed.defenses.registry import load_defense
    from testbed.errors import UserError

    try:
        return load_defense(suite_settings.defense, **suite_settings.params)
    except UserError as e:
        raise pytest.UsageError(f"--defense {suite_settings.defense}: {e}") from None


@pytest.fixture(scope="session")
def score(pytestconfig, suite_settings):
    """``score(entry, run=0) -> row``: the defense's before/after result on a zoo entry, computed once.

    ``run=1`` runs the defense a second time with the same seed (used by the determinism criterion).
    The row (a :class:`testbed.defense_row.DefenseRow`) reads like the row `testbed bench` writes (keys
    ``before``, ``after``, ``cost``, ``error``, ``error_source``...).
    """
    from testbed.defense_runner import run_defense
    from testbed.defenses.registry import load_defense

    cache = pytestconfig._segbackdoor_cache

    def _score(entry, run: int = 0) -> dict:
        key = (entry.id, run)
        if key not in cache:
            d = load_defense(suite_settings.defense, **suite_settings.params)
            cache[key] = run_defense(d, entry.run_dir, entry.data_path, device=suite_settings.device,
                                     seed=suite_settings.seed, budget_s=suite_settings.budget_s)
        return cache[key]

    return _score
