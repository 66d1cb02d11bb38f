"""Every benchmarks/p*.py runs in its smoke mode and prints its `Pn name ratio=X target>=Y` line.

Why: `make bench` is run by hand, rarely; a benchmark whose API call went stale (P1 died on `poison_file`
refusing an existing output) broke unnoticed.  The smoke mode shrinks every size to a few images so the whole
set runs in one subprocess (one torch import) in seconds; the ratios then mean nothing and are not checked,
only that each benchmark finishes and prints its line with its own number.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# Runs each benchmark's main(["--smoke"]) in this one process, its stdout captured; prints {script: [rc, out]}.
# benchmarks/ is not put on sys.path: run_all runs each script from the repository root that way (a script that
# imported a sibling as if it were did crash under `make bench` while this smoke run passed).
_DRIVER = """
import contextlib, importlib.util, io, json, sys, traceback
spec = importlib.util.spec_from_file_location("run_all", sys.argv[1] + "/run_all.py")
run_all = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_all)
results = {}
path = list(sys.path)
for script in run_all.benchmark_scripts():
    sys.path[:] = path  # what one script adds (p7 and p8 add benchmarks/) does not reach the next
    spec = importlib.util.spec_from_file_location("bench_" + script.stem, script)
    mod = importlib.util.module_from_spec(spec)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            spec.loader.exec_module(mod)
            rc = mod.main(["--smoke"])
        rc = rc if isinstance(rc, int) else 0
    except BaseException:
        rc, buf = 1, io.StringIO(buf.getvalue() + traceback.format_exc())
    results[script.name] = [rc, buf.getvalue()]
    for name, module in list(sys.modules.items()):  # nor what it imported from benchmarks/ (p7 imports p5)
        if (getattr(module, "__file__", None) or "").startswith(sys.argv[1]):
            del sys.modules[name]
print("RESULTS " + json.dumps(results))
"""


def _run_all_module():
    spec = importlib.util.spec_from_file_location("run_all_under_test", BENCH / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke_results() -> dict[str, list]:
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(BENCH)], cwd=BENCH.parent, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[-1].removeprefix("RESULTS "))


def test_every_benchmark_prints_its_line_in_smoke_mode(smoke_results):
    run_all = _run_all_module()
    names = [s.name for s in run_all.benchmark_scripts()]
    assert names and list(smoke_results) == names
    assert "p9_cpu_fast_path.py" in names  # the CPU fast path benchmark is part of `make bench`
    for name, (rc, out) in smoke_results.items():
        assert rc == 0, f"{name} failed in smoke mode:\n{out[-3000:]}"
        number = re.match(r"p(\d+)_", name).group(1)
        lines = [m for m in map(run_all._LINE.match, out.splitlines()) if m]
        assert lines, f"{name} printed no `Pn name ratio=X target>=Y` line:\n{out[-2000:]}"
        assert {m.group(1) for m in lines} == {f"P{number}"}, f"{name} printed lines of another benchmark: {lines}"


def test_benchmark_scripts_order_and_only():
    run_all = _run_all_module()
    numbers = [int(re.match(r"p(\d+)", s.name).group(1)) for s in run_all.benchmark_scripts()]
    assert numbers == sorted(numbers) and len(numbers) >= 9
    assert [s.name[:3] for s in run_all.benchmark_scripts("p1_,p4")] == ["p1_", "p4_"]


def test_p9_ratio_path_is_auto_with_native_bf16_else_the_fastest_layout():
    spec = importlib.util.spec_from_file_location("p9_under_test", BENCH / "p9_cpu_fast_path.py")
    p9 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(p9)
    rates = {"fp32": [10.0, 11.0, 12.0], "fp32_cl": [13.0, 14.0, 9.0], "bf16": [5.0, 5.0, 5.0],
             "bf16_cl": [6.0, 6.0, 6.0], "auto": [10.5, 11.5, 12.5]}
    assert p9.best_path(rates, native_bf16=True) == "auto"  # the path users get, even when another is faster
    assert p9.best_path(rates, native_bf16=False) == "fp32_cl"  # medians 11, 13, 5, 6, 11.5
    assert p9.best_path({**rates, "auto": [20.0, 20.0, 20.0]}, native_bf16=False) == "fp32_cl"  # auto = fp32 there
    assert p9.best_path({"fp32": [10.0], "fp32_cl": [9.0], "auto": [11.0]}, native_bf16=False) == "fp32"
    assert p9.timed_layouts(native_bf16=True, all_layouts=False) == list(p9.LAYOUTS)
    assert p9.timed_layouts(native_bf16=False, all_layouts=False) == ["fp32", "fp32_cl", "auto"]  # no emulated bf16
    assert p9.timed_layouts(native_bf16=False, all_layouts=True) == list(p9.LAYOUTS)
