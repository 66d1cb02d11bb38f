"""Trigger synthesis with and without unconverged candidates in the MAD, on the same searches.

Usage: python docs/make_nc_rule.py [FOLDER]    (default: docs/results/synthetic/findings/nc-fast-reference-zoo)

Neural Cleanse's MAD outlier test sees only the candidates whose mask reached the success threshold (NC's
``reg_best < inf``); this project's earlier trigger synthesis put every candidate's last mask norm into the MAD.
Each row of FOLDER/results.json (a `testbed bench` report with trigger-synthesis rows) lists the norms of its
converged candidates and the last norm of each unconverged one, so the earlier rule can be recomputed on the
very same searches: every norm in the MAD, flagged when below the median with an anomaly index above the run's
``anomaly_threshold`` (2), `inconclusive` only for a partial search or fewer than 3 candidates. Prints the bench's detection table for both rules (the same code as
the report: rates with Wilson intervals, AUROC of the score with its stratified bootstrap interval).

Only the rule differs between the two lines: the searches (schedule, success counted per image, the raw L1
penalty) are the current ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from testbed.core.errors import UserError
from testbed.defenses.trigger_synthesis import anomaly_index, flag_small, verdict_status
from testbed.stats import read_report
from testbed.stats.detection import detection_summary
from testbed.stats.render import detection_markdown

FOLDER = Path(__file__).resolve().parent / "results" / "synthetic" / "findings" / "nc-fast-reference-zoo"
EVERY = "every candidate in the MAD (earlier rule)"


def every_candidate(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the verdict the earlier rule gives on the same candidates."""
    d = row["details"]
    labels = [*d["norms"], *d["unconverged"]]
    norms = np.array([*d["norms"].values(), *(u["last_norm"] for u in d["unconverged"].values())], dtype=np.float64)
    threshold = ((row.get("settings") or {}).get("params") or {}).get("anomaly_threshold", 2.0)
    flagged = flag_small(norms, threshold)
    small = norms < np.median(norms)
    score = float(anomaly_index(norms)[small].max()) if small.any() else 0.0
    total = round(len(norms) / d["coverage"]) if d["coverage"] else 0
    status = verdict_status(bool(flagged.any()), len(norms), total)  # every candidate counted as converged
    suspected = [lab.split("->") for lab, f in zip(labels, flagged) if f] if status == "backdoored" else []
    verdict = {**row["verdict"], "backdoored": status == "backdoored", "score": score, "suspected": suspected,
               "status": status}
    return {**row, "defense": EVERY, "settings": {}, "verdict": verdict}


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = [r for r in read_report(path)["rows"] if r.get("defense") == "trigger-synthesis" and not r.get("error")]
    if not rows:
        raise UserError(f"{path} has no trigger-synthesis rows")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, nargs="?", default=FOLDER)
    args = ap.parse_args(argv)
    path = args.folder / "results.json"
    try:
        rows = _rows(path)
        now = [{**r, "defense": "converged candidates only (Neural Cleanse; current)", "settings": {}} for r in rows]
        table = detection_markdown(detection_summary(now + [every_candidate(r) for r in rows]))
    except (OSError, ValueError, KeyError, TypeError, UserError) as e:
        print(f"make_nc_rule: {path}: {e}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
