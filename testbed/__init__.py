"""segbackdoor testbed: backdoor attacks and defenses on semantic segmentation.

One import name: ``testbed``.  Its rooms, one per stage (docs/architecture.md): ``core`` (errors, atomic
writes, hashing, progress, devices, plugins), ``data`` (the dataset file, synthetic scenes, importers),
``scoring``, ``training``, ``evaluation`` (threat model, defense runner, rows), ``execution`` (local and Ray
executors), ``bench``, ``zoo``, ``demo``, ``stats``, ``commands`` and ``cli``; plus ``testbed.attacks``,
``testbed.defenses``, ``testbed.models`` and ``testbed.suites``, which in the source tree are the top-level
folders ``attacks/``, ``defenses/``, ``models/`` and ``suites/`` (an install maps them under ``testbed``).
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

# Import paths that the documentation gave before the modules moved into rooms; each keeps working as an
# alias of the module's new home (the same module object, so ``except testbed.errors.UserError`` still catches).
MOVED = {
    "errors": "core.errors",
    "atomic": "core.atomic",
    "h5data": "data.h5data",
    "synth": "data.synth",
    "train": "training.loop",
    "defense_runner": "evaluation.runner",
    "defense_row": "evaluation.rows",
}


def _install_finders() -> None:
    """Resolve old documented paths (``MOVED``) and, from a checkout, ``testbed.attacks`` & co.

    ``python -m testbed.cli``, ``torchrun -m`` and ``python -m pytest`` run from the repository root put the
    root first on ``sys.path``, so ``testbed`` comes from ``./testbed`` (which has no ``attacks/`` inside),
    not from the install.  The four subpackages then live one level up; the finder maps exactly those names.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    names = ("attacks", "defenses", "models", "suites")
    source_tree = not os.path.isdir(os.path.join(here, "attacks")) and all(
        os.path.isfile(os.path.join(root, n, "__init__.py")) for n in names)

    class _Alias(importlib.abc.Loader):
        def __init__(self, target: str) -> None:
            self.target = target

        def create_module(self, spec):
            module = importlib.import_module(self.target)
            self.real_spec = module.__spec__
            return module

        def exec_module(self, module) -> None:
            module.__spec__ = self.real_spec  # the import system gave it the alias's spec: the real one stays

    class _TestbedFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            pkg, _, name = fullname.partition(".")
            if pkg != __name__:
                return None
            if name in MOVED:
                return importlib.util.spec_from_loader(fullname, _Alias(f"{__name__}.{MOVED[name]}"))
            if source_tree and name in names:
                init = os.path.join(root, name, "__init__.py")
                return importlib.util.spec_from_file_location(fullname, init,
                                                              submodule_search_locations=[os.path.dirname(init)])
            return None

    if not any(type(f).__name__ == "_TestbedFinder" for f in sys.meta_path):
        sys.meta_path.append(_TestbedFinder())


_install_finders()
del _install_finders
