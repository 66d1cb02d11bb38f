"""The attack contract: what an attack is, so that `testbed poison`, zoo specs and the demo need no edit per attack.

An attack is the label generator T of the paper (§2) plus, optionally, its own trigger placement:

- parameters go to ``__init__`` and are only stored there (scikit-learn's convention: construction never
  fails, ``get_params`` returns them); ``fit(data, seed)`` validates them against the data's classes (and
  arrays, when it needs them) and sets fitted ``x_`` attributes; ``check_params(classes)`` is the part of
  that validation that needs only the class names (zoo specs run it before any data exists);
- ``transform(labels)`` is T: target label maps for label maps;
- ``changes(labels)`` says which samples the attack would change (a sample it would not change teaches
  nothing, so only those are candidates for poisoning); ``requires(labels)`` is the extra condition a
  sample must meet with a semantic trigger (FGBA: a source-class pixel);
- ``default_rate()`` (the paper's rate for this attack) and ``label`` (the name reports use);
- ``poison_samples(images, labels, trigger, index, split)`` makes the poisoned samples.  The default applies
  the trigger G to the images and T to the labels; an attack whose trigger depends on the sample (a patch
  placed by the labels, one object instance) overrides it and may return per-sample arrays that the
  poisoner stores next to the split (e.g. ``/test_attacked/distance``).

``params_doc`` describes each ``__init__`` parameter for the front ends: its CLI flag and zoo-spec key,
help text, type.  :mod:`testbed.attacks.registry` turns a name and options into an attack.

A trigger G is a :class:`Trigger` (here too, so that trigger modules and attacks that draw their own trigger
import it without importing each other).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np


@dataclass(frozen=True)
class Param:
    """One parameter as users see it: ``--flag`` on the CLI, ``key`` in a zoo spec's ``[[attack]]`` table."""

    help: str
    type: Callable[[str], Any] = str  # converts the CLI's string; zoo specs give typed TOML values
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # default: the keyword with dashes, e.g. target_image → --target-image

    def flag_for(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")

    def key_for(self, name: str) -> str:
        """The zoo-spec key: the flag without dashes (``--map`` → ``map``, ``--target-image`` → ``target_image``)."""
        return self.flag_for(name)[2:].replace("-", "_")


def init_params(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters of ``cls.__init__`` (what ``get_params`` returns), in order."""
    sig = inspect.signature(cls.__init__)
    return {n: p for n, p in sig.parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


class Attack:
    """Base class of attacks (a new attack may also just implement the same methods)."""

    name: ClassVar[str] = ""
    params_doc: ClassVar[dict[str, Param]] = {}
    own_trigger: ClassVar[bool] = False  # True: the attack places its own trigger (no --trigger is given)

    # -- scikit-learn style parameters ---------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in init_params(type(self))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v is not None)
        return f"{type(self).__name__}({args})"

    # -- the contract ------------------------------------------------------------------------------------
    def check_params(self, classes: list[str]) -> None:
        """Validate what needs only the class names (zoo specs call it before any data exists; fit calls it too)."""

    def fit(self, data: Any, seed: int = 0) -> "Attack":
        """Validate the parameters against ``data`` (a SegFile, or a list of class names) and resolve them."""
        raise NotImplementedError

    def transform(self, labels: np.ndarray) -> np.ndarray:
        """T: target label maps for uint8 label maps ``[N,H,W]``."""
        raise NotImplementedError

    def changes(self, labels: np.ndarray) -> np.ndarray:
        """bool ``[N]``: samples whose target label differs from their label (the poisoning candidates)."""
        labels = np.asarray(labels)
        return (self.transform(labels) != labels).reshape(labels.shape[0], -1).any(axis=1)

    def test_changes(self, labels: np.ndarray) -> np.ndarray:
        """bool ``[N]``: test images the attack can attack (default: ``changes``).

        Differs from ``changes`` only when the test-time trigger placement is not the training one (IBA's NNI
        restricts training placements to a band around the victim; test placements cover every distance).
        """
        return self.changes(labels)

    def requires(self, labels: np.ndarray) -> np.ndarray:
        """bool ``[N]``: with a semantic trigger, what a sample must hold besides the trigger class."""
        return np.ones(np.asarray(labels).shape[0], dtype=bool)

    def default_rate(self) -> float:
        """The share of training samples poisoned when no rate is given (the paper's 10%)."""
        return 0.1

    @property
    def label(self) -> str:
        """The attack's name in reports (e.g. ``fgba-n-to-1``); call after ``fit``."""
        return self.name

    def params(self) -> dict[str, Any]:
        """What the poisoned file records as ``attack.params`` (JSON-able; fitted values may be added)."""
        return dict(self.get_params())

    def poison_samples(self, images: np.ndarray, labels: np.ndarray, trigger: Any, index: np.ndarray,
                       split: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Poisoned ``(images, target labels, per-sample arrays)`` for the samples ``index`` of ``split``.

        ``split`` is ``"train"`` or ``"test"``; ``index`` are the samples' row numbers in that split, so an
        attack that draws per sample can seed by ``(seed, split, index)`` and stay independent of batching.
        """
        return trigger.apply(images), self.transform(labels), {}


class Trigger:
    """What every trigger G provides (the poisoner relies on nothing else).

    ``name`` is its ``--trigger`` spelling (``NAME`` or ``NAME:ARG``), ``options_doc`` the ``testbed poison``
    options it takes (keyword → :class:`Param`), ``from_options(arg, **options)`` builds it from those;
    ``check(image_size)`` fails early when it cannot fit; ``apply(images)`` is G; ``describe(image_size)`` is
    what the poisoned file records.  A semantic trigger (``is_semantic``) draws nothing and instead decides
    which samples are poisoned (``contains``).

    The scikit-learn convention, as for attacks: ``__init__`` only stores its parameters (as given); they are
    validated by ``_validate_params()`` at the entry points (``fit``, ``check``, ``apply``, ``describe``), so an
    error names the parameter (``{alpha}``, which the CLI spells as its flag) when the trigger is used.

    Optional hooks (defaults do nothing): ``fit(image_size, seed)`` draws a seeded pattern (blended noise, a
    warp field) before anything is checked or written; ``noise_count(poisoned, available)`` asks the poisoner for
    that many extra training samples, which ``apply_noise(images, index)`` alters while their labels stay true
    (WaNet's noise mode, which teaches the model that *other* warps are not the trigger).
    """

    name: ClassVar[str] = ""
    is_semantic: ClassVar[bool] = False
    options_doc: ClassVar[dict[str, Param]] = {}

    def _validate_params(self) -> None:
        """Raise a ParamError (naming the parameter) for a parameter out of range; default: nothing to check."""

    def fit(self, image_size: Sequence[int], seed: int = 0) -> "Trigger":
        """Draw what the trigger draws with ``seed`` for images of ``image_size``; default: only validate."""
        self._validate_params()
        return self

    def check(self, image_size: Sequence[int]) -> None:
        """Raise a UserError when the trigger cannot be applied to images of ``image_size``."""
        self._validate_params()

    def apply(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self, image_size: Sequence[int]) -> dict[str, Any]:
        raise NotImplementedError

    def noise_count(self, poisoned: int, available: int) -> int:
        """How many extra, label-keeping training samples to alter with :meth:`apply_noise` (default 0), given
        ``poisoned`` samples and ``available`` unpoisoned ones (asking for more is the trigger's ParamError)."""
        return 0

    def apply_noise(self, images: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Altered images for noise samples ``index`` (row numbers in /train, for per-sample seeds)."""
        raise NotImplementedError
