"""`testbed score RUN/ --data DATA.h5`: the paper's metrics (§3.1) for a trained run, as a table or JSON."""

from __future__ import annotations

import argparse
import textwrap
import json
import math
import sys
from pathlib import Path
from typing import Any

from testbed.core import safeload
from testbed.core.errors import UserError

EXAMPLES = """examples:
  testbed score runs/fgba/ --data fgba-n1-line.h5
  testbed score runs/fgba/ --data fgba-n1-line.h5 --json > scores.json
  testbed score repaired/ --data fgba-n1-line.h5 --before runs/fgba/metrics.json   # adds DER_seg
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score a trained model: mIoU-B, PA-B, mIoU-A, PA-A, ASR, PBA",
        description=textwrap.fill("Score a trained run on a dataset file as in the paper (§3.1): mIoU-B and PA-B on the benign "
        "test set; mIoU-A, PA-A (vs the attacker's target labels), ASR (share of pixels whose target differs from "
        "the ground truth that are predicted as the target) and PBA (mIoU over attacked pixels whose target equals "
        "the ground truth) on the attacked test set of a poisoned file. Percentages; mIoU averages the classes "
        "present in ground truth or prediction. See docs/metrics.md."),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, metavar="RUN/", help="run directory written by `testbed train`")
    p.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="dataset file (clean or poisoned)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--before", type=Path, metavar="BEFORE.json",
                   help="scores of the model before a defense (a metrics.json or `--json` output): adds DER_seg")
    p.add_argument("--out", type=Path, metavar="METRICS.json", help="also write the JSON scores to this file (atomically)")
    p.set_defaults(func=run)


def _read_before(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"--before {path}: no such file; pass the metrics.json of the model before the defense")
    before = safeload.load_object(path, "pass a metrics.json written by `testbed score`", prefix="--before ")
    for key in ("ASR", "mIoU-B"):
        v = before.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or abs(v) > 1e15:
            raise UserError(f"--before {path} has no finite numeric {key!r}; it must be scores on data with an attacked test set")
    return before


def load_scoring_run(run_dir: Path, data: Path, device_spec: str):
    """Check the inputs, then load the run: (model, config, data classes).  Shared with `testbed predict`."""
    from testbed.core.device import resolve_device
    from testbed.data.h5data import open_dataset

    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such run directory; train one with `testbed train DATA.h5 --out {run_dir}`")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory (expected the folder `testbed train --out` wrote)")
    with open_dataset(data) as f:  # fails clearly on a missing/corrupt file before the model is loaded
        classes = list(f.classes)
    device = resolve_device(device_spec)
    from testbed.training.runs import load_run

    model, config = load_run(run_dir, device)
    run_classes = config.get("classes") if isinstance(config, dict) else None
    if run_classes is not None and list(run_classes) != classes:
        raise UserError(
            f"{run_dir} was trained on {len(run_classes)} classes ({', '.join(list(run_classes)[:4])}, ...) but {data} "
            f"has {len(classes)} ({', '.join(classes[:4])}, ...); score it on data with the same classes"
        )
    return model, config, device


def _fmt(v: float | None) -> str:
    return "    —" if v is None else f"{v:6.2f}"


def format_table(scores: dict[str, Any], title: str) -> str:
    from testbed.scoring.scorer import SCORE_KEYS

    lines = [title]
    n = scores.get("num_images", {})
    attacked = n.get("attacked")
    lines.append(f"  benign images: {n.get('benign')}   attacked images: {'none' if attacked is None else attacked}")
    for key in SCORE_KEYS:
        lines.append(f"  {key:<7} {_fmt(scores.get(key))}")
    if "DER_seg" in scores:
        lines.append(f"  DER_seg  {scores['DER_seg']:.4f}   (before: ASR {scores['before']['ASR']:.2f}, "
                     f"mIoU-B {scores['before']['mIoU-B']:.2f})")
    lines.append("  per-class IoU on the benign test set (— = class absent from ground truth and prediction):")
    per_class = scores.get("per_class_iou_b") or {}
    width = max((len(c) for c in per_class), default=5)
    for name, v in per_class.items():
        lines.append(f"    {name:<{width}} {_fmt(v)}")
    if scores.get("mIoU-A") is None:
        lines.append("  (no attacked test set in this file: attacked metrics are not defined)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from testbed.commands.train import check_threads
    from testbed.core.atomic import write_json
    from testbed.core.device import torch_threads
    from testbed.scoring.metrics import der_seg
    from testbed.scoring.scorer import score_model

    from testbed.core.guards import check_outputs

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_threads(args.threads)
    if args.out is not None:
        if args.out.is_dir():
            raise UserError(f"--out {args.out} is a directory; give a file name such as {args.out / 'scores.json'}")
        check_outputs({"--out": args.out}, {"RUN/": args.run, "--data": args.data, "--before": args.before})
    before = _read_before(args.before) if args.before is not None else None
    if before is not None:
        from testbed.data import h5data
        from testbed.data.h5data import open_dataset

        with open_dataset(args.data, check_labels=False) as f:
            if h5data.TEST_ATTACKED_IMAGES not in f:
                raise UserError(f"{args.data} has no attacked test set, so DER_seg is undefined; "
                                "score on the poisoned file or drop --before")
    model, config, device = load_scoring_run(args.run, args.data, args.device)
    from testbed.training.provenance import other_data_note

    note = other_data_note(args.run, config, args.data)  # scoring another file is allowed, but said
    if note:
        print(f"testbed: {note}", file=sys.stderr)
    with torch_threads(args.threads):
        scores = score_model(model, args.data, device=device, batch_size=args.batch_size)
    scores = {**scores, "run": str(args.run), "data": str(args.data)}
    if before is not None:
        if scores["ASR"] is None or scores["mIoU-B"] is None:
            raise UserError(f"{args.data}: ASR or mIoU-B is undefined (no pixel to score), so DER_seg is too")
        scores["DER_seg"] = der_seg(before, scores)
        scores["before"] = {k: before.get(k) for k in ("mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR", "PBA")}
    if args.out is not None:
        write_json(args.out, scores)
    if args.json:
        sys.stdout.write(json.dumps(scores, allow_nan=False) + "\n")
    else:
        print(format_table(scores, f"scores of {args.run} on {args.data} (percent)"))
    return 0
