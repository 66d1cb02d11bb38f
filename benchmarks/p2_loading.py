"""P2: training-loader throughput from HDF5 vs an in-memory tensor and vs a JPEG/PNG folder, side by side.

Run: `.venv/bin/python benchmarks/p2_loading.py [--n 2000] [--size 64] [--workers 0] [--repeat 3]`.
All loaders use the trainer's settings: batch 16, seeded shuffle, drop_last, a stacking collate,
``num_workers`` as given (the trainer's default is 0) and persistent workers when > 0.
- h5:        ``testbed.data.h5data.SegDataset`` (what ``testbed train`` uses; small files are read into memory once)
- memory:    ``TensorDataset`` over the same uint8 arrays already in memory (the upper bound)
- jpegfolder: an ADE20K-style folder (images/*.jpg, annotations/*.png) read with PIL per sample
Detail lines add SegDataset with ``in_memory=False`` (chunked reads: what a 20k×512² set gets).
Rounds are interleaved (h5, memory, folder, h5, ...) and the best epoch of each is kept.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _collate(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


class FolderDataset(torch.utils.data.Dataset):
    """ADE20K-style folder: decode JPEG image + PNG mask with PIL, to uint8 tensors."""

    def __init__(self, root: Path, n: int) -> None:
        self.images = [root / "images" / f"{i:06d}.jpg" for i in range(n)]
        self.masks = [root / "annotations" / f"{i:06d}.png" for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.images[i]) as im:
            x = torch.from_numpy(np.array(im.convert("RGB")))
        with Image.open(self.masks[i]) as mk:
            y = torch.from_numpy(np.array(mk))
        return x, y


def _loader(ds, workers: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds, batch_size=16, shuffle=True, generator=g, drop_last=True, num_workers=workers, collate_fn=_collate,
        persistent_workers=workers > 0,
    )


def _epoch(loader, max_batches: int | None = None) -> float:
    """Images per second for one full pass (or its first ``max_batches`` batches)."""
    t = time.perf_counter()
    n = 0
    for b, (x, y) in enumerate(loader):
        n += x.shape[0]
        if max_batches is not None and b + 1 >= max_batches:
            break
    return n / (time.perf_counter() - t)


def _prepare(tmp: Path, n: int, size: int):
    from PIL import Image

    from testbed.data import h5data
    from testbed.data.synth import SYNTH_CLASSES, synth_scenes

    x, y = synth_scenes(n, size=size, seed=0)
    h5 = h5data.write_dataset(tmp / "d.h5", {"train/images": x, "train/labels": y, "test/images": x[:16], "test/labels": y[:16]},
                              SYNTH_CLASSES, source={"generator": "p2"})
    root = tmp / "folder"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(n):
        Image.fromarray(x[i]).save(root / "images" / f"{i:06d}.jpg", quality=90)
        Image.fromarray(y[i], mode="L").save(root / "annotations" / f"{i:06d}.png")
    return x, y, h5, root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="images (default 2000)")
    ap.add_argument("--size", type=int, default=64, help="image side (default 64)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0, the trainer's default)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; best epoch kept (default 3)")
    ap.add_argument("--dataset-class", default="testbed.data.h5data:SegDataset",
                    help="MODULE:CLASS of the HDF5 dataset to measure (to try a faster SegDataset; default the real one)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs; its ratio means nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(n=32, size=32, repeat=1)
    torch.set_num_threads(1)
    import importlib

    mod, _, cls = args.dataset_class.partition(":")
    seg_dataset = getattr(importlib.import_module(mod), cls)

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        x, y, h5, root = _prepare(Path(d), args.n, args.size)
        prep = time.perf_counter() - t
        datasets = {
            "h5": seg_dataset(h5, "train"),
            "memory": torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
            "jpegfolder": FolderDataset(root, args.n),
            "h5_chunked": seg_dataset(h5, "train", in_memory=False),
        }
        loaders = {k: _loader(ds, args.workers) for k, ds in datasets.items()}
        cap = {"h5_chunked": 25}  # a detail only; keeps the run short however slow chunked reads are
        for k, ld in loaders.items():  # warm-up: worker start, page cache, lazy in-memory read
            _epoch(ld, 5 if k in cap else None)
        best = {k: 0.0 for k in loaders}
        for _ in range(args.repeat):
            for k, ld in loaders.items():
                best[k] = max(best[k], _epoch(ld, cap.get(k)))
        # correctness: the HDF5 loader yields exactly the file's samples
        sample = next(iter(_loader(datasets["h5"], 0, seed=1)))
        ref = next(iter(_loader(datasets["memory"], 0, seed=1)))
        assert torch.equal(sample[0], ref[0]) and torch.equal(sample[1], ref[1])
    r_mem = best["h5"] / best["memory"]
    r_folder = best["h5"] / best["jpegfolder"]
    print(f"P2 loader_h5_vs_memory ratio={r_mem:.2f} target>=0.8")
    print(f"P2 loader_h5_vs_jpegfolder ratio={r_folder:.2f} target>=3")
    print(f"  images/s (batch 16, shuffle, workers={args.workers}, {args.n} images {args.size}x{args.size}, best of {args.repeat}): "
          + ", ".join(f"{k} {v:,.0f}" for k, v in best.items()))
    print(f"  h5_chunked (SegDataset in_memory=False: h5py reads per batch, first 25 batches) ÷ memory = {best['h5_chunked'] / best['memory']:.2f}")
    if args.dataset_class != ap.get_default("dataset_class"):
        print(f"  HDF5 dataset class: {args.dataset_class}")
    print(f"  setup (synth + write h5 + write {2 * args.n} JPEG/PNG files): {prep:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
