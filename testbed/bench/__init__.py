"""Bench: run defenses over many models and report (settings, run, store, workers, report, markdown, plots).

``from testbed.bench import run_bench`` is the documented entry point; the objects it takes are re-exported
beside it.
"""

from testbed.bench.run import run_bench
from testbed.bench.settings import BenchModel, BenchSettings, Execution, ModelSource, ReportOptions

__all__ = ["BenchModel", "BenchSettings", "Execution", "ModelSource", "ReportOptions", "run_bench"]
