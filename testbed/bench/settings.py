"""What a bench is told: which models (:class:`ModelSource`, :class:`BenchModel`), how each pair runs
(:class:`BenchSettings`, recorded in every row), how the pairs are executed (:class:`Execution`) and how the
report is written (:class:`ReportOptions`).  Plain dataclasses, shared by :mod:`testbed.bench.run` and
:mod:`testbed.bench.workers`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass
class BenchModel:
    """One model to defend: its run, the data it was poisoned with, what attack (for the report).

    ``seed`` and ``group`` are set for zoo entries (the statistics group rows by them); ``trained_on_data``
    says that ``data_path`` is known to be the file the model was trained on (a zoo entry's), so it is not
    hashed to check.  ``benign_floor`` (a zoo's attacked entry): ``{"entry": ID, "ASR": A}``, the ASR the zoo's
    benign model of the same architecture, seed and training axes scores on this entry's attacked test set; an
    ASR before the defense that does not exceed it measures no backdoor (DER n/a)."""

    id: str
    run_dir: Path
    data_path: Path
    attack: str | None = None
    is_benign: bool | None = None
    seed: int | None = None
    group: dict[str, Any] | None = None
    trained_on_data: bool = False
    benign_floor: dict[str, Any] | None = None


@dataclass
class ModelSource:
    """Where the models come from: a zoo (``zoo``, optionally only the entries matching the glob ``entries``),
    one run with its data (``run`` + ``data``), or a list of :class:`BenchModel` (``models``)."""

    zoo: str | os.PathLike | None = None
    run: str | os.PathLike | None = None
    data: str | os.PathLike | None = None
    entries: str | None = None
    models: Sequence[BenchModel] | None = None


@dataclass
class BenchSettings:
    """How every pair of one bench is run (recorded, resolved, in each row's ``settings``).

    ``device`` ``"auto"`` is resolved once for the bench (a Ray task picks its own); ``threads`` None means
    this machine's cores ÷ workers (1 per Ray task)."""

    seed: int = 0
    budget_s: float | None = None
    budget_passes: int | None = None
    batch_size: int = 32
    device: str = "auto"
    threads: int | None = None
    min_asr: float = 50.0
    save_model: bool = False
    random_control: bool = True


@dataclass
class Execution:
    """Where the pairs run: this process (``workers`` 1), N local processes, or Ray tasks (``backend="ray"``,
    joining ``ray_address``); ``progress`` bars, full tracebacks with ``debug``, lines to ``log`` (stderr)."""

    workers: int = 1
    backend: str = "local"
    ray_address: str | None = None
    progress: bool = True
    debug: bool = False
    log: Callable[[str], None] | None = None


@dataclass
class ReportOptions:
    """How the report is written: its ``title``, with ``figures``; ``overwrite`` discards an existing report
    first, ``rerun`` runs again the pairs it already holds with the same settings."""

    title: str = "Defense benchmark"
    figures: bool = True
    overwrite: bool = False
    rerun: bool = False
