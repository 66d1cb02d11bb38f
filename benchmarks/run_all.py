"""Run every benchmarks/p*.py in order, each in its own process (one crash does not stop the rest).

Run: `.venv/bin/python benchmarks/run_all.py [--only p2,p4] [--timeout 300] [--smoke]` (what `make bench` does).
Each benchmark prints `Pn name ratio=X target>=Y` then detail lines; this prints a summary at the end
and exits 1 if any benchmark crashed or timed out (a missed target is reported, not an error).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_CALL_MAIN = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('bench', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
    "rc = mod.main(sys.argv[2:])\n"
    "sys.exit(rc if isinstance(rc, int) else 0)\n"
)
_LINE = re.compile(r"^(P\d+) (\S+) (?:ratio|max_rel_err)=([-\d.naif]+) target(>=|<=)([\d.]+)")


def benchmark_scripts(only: str = "") -> list[Path]:
    """benchmarks/p*.py in numeric order; ``only``: comma-separated name prefixes (e.g. "p2,p4")."""
    scripts = sorted(HERE.glob("p[0-9]*.py"), key=lambda p: (int(re.match(r"p(\d+)", p.name).group(1)), p.name))
    wanted = tuple(s.strip() for s in only.split(",") if s.strip())
    return [s for s in scripts if s.name.startswith(wanted)] if wanted else scripts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run all benchmarks (benchmarks/p*.py), each in a subprocess.")
    ap.add_argument("--only", default="", help="comma-separated prefixes, e.g. p2,p4 (default: all)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per benchmark (default 300)")
    ap.add_argument("--smoke", action="store_true",
                    help="each benchmark at tiny sizes: checks that every one runs and prints its line; the ratios mean nothing")
    args = ap.parse_args(argv)
    scripts = benchmark_scripts(args.only)
    summary, failed = [], []
    start = time.perf_counter()
    for script in scripts:
        t = time.perf_counter()
        print(f"== {script.name}", flush=True)
        try:
            proc = subprocess.run([sys.executable, "-c", _CALL_MAIN, str(script), *(["--smoke"] if args.smoke else [])], cwd=HERE.parent, timeout=args.timeout,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = f"timeout after {args.timeout:.0f}s"
        print(out, end="" if out.endswith("\n") or not out else "\n", flush=True)
        lines = [m for m in (_LINE.match(line) for line in out.splitlines()) if m]
        if rc != 0:
            failed.append(f"{script.name} ({rc if isinstance(rc, str) else f'exit {rc}'})")
        for m in lines:
            ratio, op, target = float(m.group(3)), m.group(4), float(m.group(5))
            ok = ratio >= target if op == ">=" else ratio <= target
            summary.append(f"{m.group(1)} {m.group(2)} ratio={ratio:.2f} target{op}{target:g} {'ok' if ok else 'MISSED'}")
        print(f"   ({time.perf_counter() - t:.1f}s)", flush=True)
    print(f"\n== summary ({len(scripts)} benchmarks, {time.perf_counter() - start:.0f}s)")
    for line in summary:
        print(line)
    for f in failed:
        print(f"FAILED {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
