"""pytest plugin: options, fixtures and per-entry parametrization for robustness suites.

Every fixture is inert unless ``--zoo`` is given, so installing segbackdoor never changes an unrelated
pytest run.  A defense's result on an entry is computed once per session and shared by all criteria.
Parameters are parsed by the same function as `testbed defend --param` (one syntax everywhere), and bad
options are one-line usage errors.
"""

from __future__ import annotations

from typing import Any

import pytest

from testbed.core.seeds import seed_arg


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


def session():
    """:mod:`testbed.suites.session`, what a suite run needs (torch, the defenses, the zoo): the plugin's one lazy
    import, so that `pytest --help` and unrelated test runs in an environment with segbackdoor installed (where
    pytest loads this plugin) never pay for it."""
    from testbed.suites import session as module

    return module


def _settings(config: pytest.Config) -> Any:
    """The suite's settings (:class:`testbed.suites.session.SuiteSettings`), or None without ``--zoo``; validated
    once (at configure) and kept on ``config``: every later caller gets the same object, and a bad option never
    reaches a test."""
    if not hasattr(config, "_segbackdoor_settings"):
        zoo = config.getoption("--zoo")
        config._segbackdoor_settings = None if zoo is None else session().validated(config, zoo)
    return config._segbackdoor_settings


@pytest.hookimpl(tryfirst=True)  # before junitxml reads --junitprefix
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "benign_only: run only on benign zoo entries")
    config.addinivalue_line("markers", "backdoored_only: run only on backdoored zoo entries")
    config._segbackdoor_cache = {}  # (entry id, run number) -> result row
    settings = _settings(config)  # bad options are one usage error before collection, not an error of every test
    if settings is not None:
        config._segbackdoor_zoo = session().open_suite_zoo(settings)  # so is a missing or tampered zoo (verified once, then cached)
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


def pytest_sessionstart(session: pytest.Session) -> None:
    """The progress line's file name too (``test_robustness.py .F``, not ``../test_robustness.py .F``): pytest
    writes it relative to where it was started, from the same rootdir-relative path; for a node id whose path
    does not exist under the rootdir, the terminal writes it relative to the rootdir instead (as the id is)."""
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if _settings(config) is None or reporter is None or not hasattr(reporter, "startpath"):
        return
    write = reporter.write_fspath_result

    def write_as_it_is(nodeid: str, res: str, **markup: bool) -> None:
        if (config.rootpath / nodeid.split("::")[0]).exists():
            return write(nodeid, res, **markup)
        start, reporter.startpath = reporter.startpath, config.rootpath
        try:
            return write(nodeid, res, **markup)
        finally:
            reporter.startpath = start

    reporter.write_fspath_result = write_as_it_is


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
def suite_settings(pytestconfig) -> Any:
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
    return session().new_defense(suite_settings)


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
            cache[key] = session().run_on_entry(entry, suite_settings)
        return cache[key]

    return _score
