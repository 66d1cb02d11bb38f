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


# docs/architecture.md's layers, lowest first: a module may import only from its own layer or lower ones
LAYERS = [
    ["core"],
    ["data"],
    ["models"],
    ["attacks"],
    ["scoring", "stats"],
    ["training"],
    ["defenses", "defense"],
    ["evaluation"],
    ["execution", "bench", "zoo", "demo"],
    ["cli", "commands", "suites"],
]


def _layer_of(module: str) -> int | None:
    """The layer of ``testbed.X[.Y]`` (None for the package itself)."""
    parts = module.split(".")
    if parts[0] != "testbed" or len(parts) < 2 or parts[1] == "__version__":
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"testbed.{parts[1]} is in no layer of docs/architecture.md; add it there and here")


def test_nothing_imports_upward():
    import ast

    folders = {"testbed": "testbed", "attacks": "testbed.attacks", "defenses": "testbed.defenses",
               "models": "testbed.models", "suites": "testbed.suites"}
    bad = []
    for folder, package in folders.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            me = ".".join([package, *parts])
            mine = _layer_of(me)
            if mine is None:
                continue
            for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions count too
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + ([f"testbed.{a.name}" for a in node.names] if node.module == "testbed" else [])
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for name in names:
                    theirs = _layer_of(name)
                    if theirs is not None and theirs > mine:
                        bad.append(f"{me} imports {name}")
    assert bad == []


def test_old_documented_paths_are_the_new_modules():
    """``testbed.errors`` & co. (paths the docs gave before the rooms) are aliases: the very same module objects."""
    import importlib

    import testbed

    for old, new in testbed.MOVED.items():
        assert importlib.import_module(f"testbed.{old}") is importlib.import_module(f"testbed.{new}"), old
    from testbed.core.errors import UserError
    from testbed.errors import UserError as OldUserError

    assert OldUserError is UserError
    readme = (ROOT / "README.md").read_text()
    assert all(f"`testbed.{old}`" in readme for old in testbed.MOVED)  # each alias is documented


def test_no_loose_module_at_the_top_of_testbed():
    """A module lives in its room: only cli.py, the public defense.py path and __init__.py sit at the top."""
    loose = sorted(p.name for p in (ROOT / "testbed").glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "defense.py"]
