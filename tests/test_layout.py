"""The install layout: one top-level import name (``testbed``), the four folders mapped under it."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("attacks", "defenses", "models", "suites")


def _run(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_nothing_installed_at_top_level_but_testbed(tmp_path):
    # from a neutral directory only the install is visible: no top-level models/attacks/defenses/suites
    out = _run("import importlib.util as u; print(','.join(n for n in %r if u.find_spec(n) is not None))" % (MAPPED,),
               tmp_path)
    assert out == ""


def test_mapped_packages_live_in_their_folders(tmp_path):
    code = ("import os, testbed.attacks, testbed.defenses, testbed.models, testbed.suites as s; "
            "print('\\n'.join(os.path.realpath(m.__file__) for m in "
            "(testbed.attacks, testbed.defenses, testbed.models, s)))")
    for cwd in (tmp_path, ROOT):  # installed, and from the checkout root (python -m, torchrun, pytest)
        files = _run(code, cwd).splitlines()
        assert files == [str(ROOT / n / "__init__.py") for n in MAPPED], cwd


def test_checkout_root_does_not_load_a_second_copy():
    # from the root, testbed.models and the stray top-level "models" must not both be imported by the testbed
    out = _run("import sys, testbed.cli, testbed.models, testbed.attacks, testbed.defenses; "
               "print(','.join(n for n in %r if n in sys.modules))" % (MAPPED,), ROOT)
    assert out == ""


def test_every_package_folder_is_declared():
    """pyproject lists packages explicitly (package-dir mapping); a new subpackage must be added there."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(conf["packages"])
    mapping = conf["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join((pkg, *rel.parts)) if rel.parts else pkg)
    assert found == declared
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert entry == {"segbackdoor_suites": "testbed.suites.plugin"}
