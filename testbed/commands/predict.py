"""`testbed predict RUN/ --data DATA.h5 --split test --out PRED.h5`: argmax predictions of a run, in split order."""

from __future__ import annotations

import argparse
import textwrap
import io
import json
from pathlib import Path

from testbed.core.errors import UserError

EXAMPLES = """examples:
  testbed predict runs/fgba/ --data fgba-n1-line.h5 --split test --out pred-test.h5
  testbed predict runs/fgba/ --data fgba-n1-line.h5 --split test_attacked --out pred-att.h5 --png pred-att/
"""

SPLITS = ("test", "test_attacked")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="write a run's argmax predictions on a test split to HDF5 (and PNGs)",
        description=textwrap.fill("Predict every image of a test split with a trained run and write /pred uint8 [M,H,W] "
        "(same order as the split) to an HDF5 file, atomically. With --png, also one PNG per image: the input "
        "and the colourized prediction side by side."),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, metavar="RUN/", help="run directory written by `testbed train`")
    p.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="dataset file")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="test (all of /test) or test_attacked (a poisoned file's triggered test images); default: test")
    p.add_argument("--out", type=Path, required=True, metavar="PRED.h5", help="output HDF5 file")
    p.add_argument("--png", type=Path, metavar="DIR", help="also write DIR/NNNNN.png (image | prediction); DIR must be new or empty")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.set_defaults(func=run)


def _png_bytes(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    import contextlib

    import numpy as np

    from testbed.core.atomic import atomic_dir
    from testbed.commands.score import load_scoring_run
    from testbed.core.guards import check_outputs
    from testbed.data.h5data import atomic_h5, open_dataset
    from testbed.core.palette import colorize
    from testbed.scoring.scorer import iter_predictions

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out.exists() and args.out.is_dir():
        raise UserError(f"--out {args.out} is a directory; give a file name such as pred.h5")
    if args.png is not None and args.png.exists() and (not args.png.is_dir() or any(args.png.iterdir())):
        raise UserError(f"--png {args.png} exists and is not an empty directory; choose a new directory")
    check_outputs({"--out": args.out, "--png": args.png}, {"RUN/": args.run, "--data": args.data})
    with open_dataset(args.data, check_labels=False) as f:
        if f"{args.split}/images" not in f:
            raise UserError(f"{args.data} has no /{args.split} split (only poisoned files have test_attacked); "
                            "use --split test or a file written by `testbed poison`")
    model, _, device = load_scoring_run(args.run, args.data, args.device)

    with open_dataset(args.data, check_labels=False) as f:
        images = f.file[f"{args.split}/images"]
        n, h, w = images.shape[:3]
        classes, stored = list(f.classes), f.palette
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(atomic_h5(args.out))
            tmp_png = stack.enter_context(atomic_dir(args.png)) if args.png is not None else None
            pred_ds = out.create_dataset("pred", shape=(n, h, w), dtype=np.uint8,
                                         chunks=(1, h, w) if n else None)
            out.attrs["run"] = str(args.run)
            out.attrs["data"] = str(args.data)
            out.attrs["split"] = args.split
            out.attrs["classes"] = json.dumps(classes)
            for s, e, x, pred in iter_predictions(model, images, device, args.batch_size, None, len(classes),
                                                   f"predict {args.split}"):
                p = pred.to("cpu").numpy().astype(np.uint8)
                pred_ds[s:e] = p
                if tmp_png is not None:
                    side = np.concatenate([x, colorize(p, len(classes), stored, classes)], axis=2)  # [B,H,2W,3]
                    for j in range(e - s):
                        (tmp_png / f"{s + j:05d}.png").write_bytes(_png_bytes(side[j]))
    print(f"wrote {n} predictions of /{args.split} to {args.out}" + (f" and PNGs to {args.png}/" if args.png else ""))
    return 0
