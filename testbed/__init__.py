"""segbackdoor testbed: backdoor attacks and defenses on semantic segmentation.

One import name: ``testbed`` (core), ``testbed.attacks``, ``testbed.defenses``, ``testbed.models`` and
``testbed.suites``.  In the source tree the last four are the top-level folders ``attacks/``, ``defenses/``,
``models/`` and ``suites/``; an install maps them under ``testbed`` (setuptools ``package-dir``).
"""

__version__ = "0.1.0"


def _from_source_tree() -> None:
    """Resolve ``testbed.attacks`` & co. when ``testbed`` itself was imported from a checkout.

    ``python -m testbed.cli``, ``torchrun -m`` and ``python -m pytest`` run from the repository root put the
    root first on ``sys.path``, so ``testbed`` comes from ``./testbed`` (which has no ``attacks/`` inside),
    not from the install.  The four subpackages then live one level up; a finder maps exactly those names.
    """
    import importlib.abc
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    names = ("attacks", "defenses", "models", "suites")
    if os.path.isdir(os.path.join(here, "attacks")) or not all(
            os.path.isfile(os.path.join(root, n, "__init__.py")) for n in names):
        return  # an installed testbed (wheel or editable link tree): nothing to do

    class _SourceTreeFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            pkg, _, name = fullname.partition(".")
            if pkg != __name__ or name not in names:
                return None
            init = os.path.join(root, name, "__init__.py")
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[os.path.dirname(init)])

    if not any(type(f).__name__ == "_SourceTreeFinder" for f in sys.meta_path):
        sys.meta_path.append(_SourceTreeFinder())


_from_source_tree()
del _from_source_tree
