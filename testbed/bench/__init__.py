"""Bench: run defenses over many models and report (run, store, workers, report, markdown, plots).

``from testbed.bench import run_bench`` is the documented entry point.
"""

from testbed.bench.run import run_bench

__all__ = ["run_bench"]
