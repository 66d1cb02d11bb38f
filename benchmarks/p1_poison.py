"""P1: `testbed poison` throughput ÷ a plain h5py copy of the same arrays (the I/O limit); target ≥ 0.5.

Both sides run in this one process on the same clean file: the copy reads every array of the clean file and
writes it to a new file with the same chunking and compression, then fsyncs (as the poisoner's atomic write
does).  The poisoner (``attacks.poison_file``, FGBA N-to-1 → wall, line trigger, 10%) does all its work:
content hash of the parent, label scans, selection, the blended trigger, T, originals, attacked test set.
Each side is timed ``REPEATS`` times, alternating, and the median is used.

    .venv/bin/python benchmarks/p1_poison.py [--n 2000] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPEATS = 5


def make_clean(path: Path, n: int, m: int, size: int) -> str:
    """The synthetic scenes when testbed.data.synth exists, else random arrays (same sizes, same I/O)."""
    try:
        from testbed.data.synth import make_synth_dataset

        make_synth_dataset(path, n_train=n, n_test=m, size=size, seed=0)
        return "testbed.data.synth scenes"
    except ImportError:
        from testbed.data.h5data import write_dataset

        rng = np.random.default_rng(0)
        classes = ["wall", "building", "sky", "floor", "tree", "ceiling", "road", "grass", "person", "car", "palm"]
        arrays = {
            "train/images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "train/labels": rng.integers(0, len(classes), (n, size, size), dtype=np.uint8),
            "test/images": rng.integers(0, 256, (m, size, size, 3), dtype=np.uint8),
            "test/labels": rng.integers(0, len(classes), (m, size, size), dtype=np.uint8),
        }
        write_dataset(path, arrays, classes, source={"generator": "random"})
        return "random arrays"


def h5_copy(src_path: Path, dst_path: Path) -> None:
    """Read every array of the clean file and write it to a new file (same chunks/compression), fsync."""
    with h5py.File(src_path, "r") as src, h5py.File(dst_path, "w") as dst:
        names: list[str] = []
        src.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            ds = src[name]
            data = ds[()]
            dst.create_dataset(name, data=data, chunks=ds.chunks, compression=ds.compression)
        for k, v in src.attrs.items():
            dst.attrs[k] = v
    with open(dst_path, "rb+") as f:
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="training images (default 2000)")
    ap.add_argument("--test", type=int, default=400, help="test images (default 400)")
    ap.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    ap.add_argument("--repeats", type=int, default=REPEATS, help=f"timed runs of each side (default {REPEATS})")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs; its ratio means nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(n=24, test=8, size=32, repeats=1)

    from testbed import attacks
    from testbed.core import progress

    progress.set_quiet(True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        clean = tmp / "clean.h5"
        kind = make_clean(clean, args.n, args.test, args.size)
        nbytes = clean.stat().st_size
        t_copy, t_poison = [], []
        for i in range(args.repeats):  # a fresh output name each time: poison_file refuses to replace one
            copy_out, poison_out = tmp / f"copy{i}.h5", tmp / f"poisoned{i}.h5"
            t0 = time.perf_counter()
            h5_copy(clean, copy_out)
            t_copy.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            attacks.poison_file(clean, poison_out, attack="fgba", preset="n-to-1", target="wall",
                                trigger="line", rate=0.1, seed=0)
            t_poison.append(time.perf_counter() - t0)
            copy_out.unlink()
            poison_out.unlink()
        images = args.n + args.test
        copy_s, poison_s = statistics.median(t_copy), statistics.median(t_poison)
        ratio = (images / poison_s) / (images / copy_s)
        print(f"P1 poison_vs_h5copy ratio={ratio:.2f} target>=0.5")
        print(f"  data: {kind}, {args.n} train + {args.test} test images at {args.size}x{args.size}, {nbytes / 2**20:.1f} MiB")
        print(f"  poison_file (fgba n-to-1 wall, line, 10%): {poison_s * 1e3:.0f} ms median of {args.repeats} = {images / poison_s:.0f} images/s")
        print(f"  h5py read+write copy of the same arrays:   {copy_s * 1e3:.0f} ms median of {args.repeats} = {images / copy_s:.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
