"""Trigger synthesis with and without unconverged candidates in the MAD, on the same searches.

Usage: python docs/make_nc_rule.py [FOLDER]    (default: docs/results/synthetic/findings/nc-fast-reference-zoo)

Neural Cleanse's MAD outlier test sees only the candidates whose mask reached the success threshold (NC's
``reg_best < inf``); this project's earlier trigger synthesis put every candidate's last mask norm into the MAD.
Each row of FOLDER/results.json (a `testbed bench` report with trigger-synthesis rows) lists the norms of its
converged candidates and the last norm of each unconverged one, so the earlier rule can be recomputed on the
very same searches: every norm in the MAD, flagged when below the median with an anomaly index above 2, and no
`inconclusive` (the earlier rule had none). Prints the bench's detection table for both rules (the same code as
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

from testbed.defenses.trigger_synthesis import anomaly_index, flag_small
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
    flagged = flag_small(norms)
    small = norms < np.median(norms)
    score = float(anomaly_index(norms)[small].max()) if small.any() else 0.0
    suspected = [lab.split("->") for lab, f in zip(labels, flagged) if f]
    verdict = {**row["verdict"], "backdoored": bool(suspected), "score": score, "suspected": suspected,
               "status": "backdoored" if suspected else "clean"}
    return {**row, "defense": EVERY, "settings": {}, "verdict": verdict}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, nargs="?", default=FOLDER)
    args = ap.parse_args(argv)
    path = args.folder / "results.json"
    if not path.is_file():
        print(f"make_nc_rule: no {path}", file=sys.stderr)
        return 2
    rows = [r for r in read_report(path)["rows"] if r["defense"] == "trigger-synthesis" and not r.get("error")]
    now = [{**r, "defense": "converged candidates only (Neural Cleanse; current)", "settings": {}} for r in rows]
    print(detection_markdown(detection_summary(now + [every_candidate(r) for r in rows])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
