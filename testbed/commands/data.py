"""`testbed data`: make (synth), import (ade20k, folder), inspect (info) and look at (show) dataset files."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from testbed.core.errors import UserError
from testbed.core.seeds import seed_arg

SYNTH_EXAMPLES = """examples:
  testbed data synth --out synth.h5
  testbed data synth --out big.h5 --n-train 5000 --n-test 500 --size 128 --seed 1 --compression lzf"""
IMPORT_EXAMPLES = """examples:
  testbed data import ade20k ~/data/ADEChallengeData2016 --out ade20k-512.h5 --workers 8
  testbed data import folder ~/data/voc --classes voc-names.txt --out voc.h5 --size 256"""
INFO_EXAMPLES = """examples:
  testbed data info synth.h5
  testbed data info poisoned.h5 --json > info.json"""
SHOW_EXAMPLES = """examples:
  testbed data show synth.h5 --index 3 --out sample.png
  testbed data show poisoned.h5 --split train --index 17 --out fig1.png   (a poisoned index: Figure 1/2 panel)
  testbed data show poisoned.h5 --split test_attacked --index 0 --out attacked.png"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "data", help="make, import, inspect and show dataset files",
        description="Dataset files (HDF5, see docs/data-format.md): generate the embedded synthetic scenes, import ADE20K or any "
        "images/+masks/ folder, print statistics, draw a sample.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SYNTH_EXAMPLES + "\n" + IMPORT_EXAMPLES.split("\n", 1)[1] + "\n" + INFO_EXAMPLES.split("\n", 1)[1],
    )
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    _register_synth(sub)
    _register_import(sub)
    _register_info_show(sub)


def _register_synth(sub) -> None:
    s = sub.add_parser(
        "synth", help="generate procedural indoor/street/park scenes (no download)",
        description="Generate the embedded synthetic dataset: procedural scenes with ADE20K class names "
        "(wall, building, sky, floor, tree, ceiling, road, grass, person, car, palm). Same seed, same bytes.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SYNTH_EXAMPLES,
    )
    s.add_argument("--out", required=True, type=Path, help="output dataset file (.h5)")
    s.add_argument("--n-train", type=int, default=1000, help="training images (default 1000)")
    s.add_argument("--n-test", type=int, default=200, help="test images (default 200)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--seed", type=seed_arg, default=0, help="random seed (default 0)")
    _add_common_out(s)
    s.set_defaults(func=run_synth)


def _register_import(sub) -> None:
    imp = sub.add_parser(
        "import", help="import ADE20K or an images/+masks/ folder",
        description="Import a real dataset into one dataset file (decoding in parallel, streamed to disk).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=IMPORT_EXAMPLES,
    )
    isub = imp.add_subparsers(dest="import_kind", required=True, metavar="KIND")
    a = isub.add_parser(
        "ade20k", help="ADE20K SceneParsing (ADEChallengeData2016/)",
        description="Import ADEChallengeData2016/ (images/{training,validation}/*.jpg, annotations/.../*.png). "
        "training → train, validation → test; raw 0 ('other') → 255 (ignore), raw v → v−1 (wall=0 ... flag=149). "
        "Images are resized (shorter side, bilinear; labels nearest) and centre-cropped to --size.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=IMPORT_EXAMPLES,
    )
    a.add_argument("root", type=Path, help="the ADEChallengeData2016 folder")
    a.add_argument("--out", required=True, type=Path, help="output dataset file (.h5)")
    a.add_argument("--size", type=int, default=512, help="square output size in pixels (default 512)")
    a.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count, at most 8)")
    _add_common_out(a)
    a.set_defaults(func=run_import_ade20k)
    fo = isub.add_parser(
        "folder", help="any ROOT/images + ROOT/masks pairs (Cityscapes, VOC, ... via id masks)",
        description="Import ROOT/images/* with ROOT/masks/<same stem>.png holding class ids (255 = ignore). "
        "Splits: ROOT/images/{train,test} (and masks/{train,test}) when present, else a seeded --test-fraction.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=IMPORT_EXAMPLES,
    )
    fo.add_argument("root", type=Path, help="folder with images/ and masks/")
    fo.add_argument("--classes", required=True, type=Path, help="text file: one class name per line, in id order")
    fo.add_argument("--out", required=True, type=Path, help="output dataset file (.h5)")
    fo.add_argument("--size", type=int, default=None, help="resize + centre-crop to SIZE×SIZE (default: keep; all images must match)")
    fo.add_argument("--test-fraction", type=float, default=0.2, help="share of pairs for the test split without train/test folders (default 0.2)")
    fo.add_argument("--seed", type=seed_arg, default=0, help="seed of the train/test split (default 0)")
    fo.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count, at most 8)")
    _add_common_out(fo)
    fo.set_defaults(func=run_import_folder)


def _register_info_show(sub) -> None:
    i = sub.add_parser(
        "info", help="classes, sizes, class statistics, attack metadata, content hash",
        description="Print what a dataset file holds: classes, split sizes, per-class pixel share, share of images "
        "containing each class, class co-occurrence, attack metadata and achieved poison rate, content hash.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=INFO_EXAMPLES,
    )
    i.add_argument("path", type=Path, help="dataset file (.h5)")
    i.add_argument("--json", action="store_true", help="print JSON (full co-occurrence matrix included)")
    i.add_argument("--no-stats", action="store_true", help="skip class statistics (fast on very large files)")
    i.set_defaults(func=run_info)

    sh = sub.add_parser(
        "show", help="draw one sample (image beside its colourized labels) to a PNG",
        description="Draw one sample beside its colourized label map with a legend. For a poisoned training index: "
        "benign image, poisoned image, benign label, target label (the paper's Figures 1/2). For --split "
        "test_attacked: image, ground truth, attacker's target.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SHOW_EXAMPLES,
    )
    sh.add_argument("path", type=Path, help="dataset file (.h5)")
    sh.add_argument("--split", default="train", help="train, test or test_attacked (default train)")
    sh.add_argument("--index", type=int, default=0, help="sample index within the split (default 0)")
    sh.add_argument("--out", required=True, type=Path, help="output PNG")
    sh.set_defaults(func=run_show)


def _add_common_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compression", choices=("lzf", "gzip", "none"), default="none", help="HDF5 compression (default none: fastest reads)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _check_out(path: Path, force: bool = True) -> None:
    """Fail before any work when --out cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output directory {parent} does not exist; create it first or choose another --out")
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name")
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")


def _compression(value: str) -> str | None:
    return None if value == "none" else value


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{name} must be at least 1, got {value}")


def _done(path: Path) -> None:
    from testbed.data import h5data

    with h5data.open_dataset(path, check_labels=False) as f:
        print(f"wrote {path}: {f.length('train')} train + {f.length('test')} test images, "
              f"{f.image_size[0]}x{f.image_size[1]}, {f.num_classes} classes")


# -- synth / import ---------------------------------------------------------------------------------
def run_synth(args: argparse.Namespace) -> int:
    from testbed.data.synth import make_synth_dataset

    _positive("--n-train", args.n_train)
    _positive("--n-test", args.n_test)
    if args.size < 8:
        raise UserError(f"--size must be at least 8 pixels, got {args.size}")
    _check_out(args.out, args.force)
    make_synth_dataset(args.out, n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed,
                       compression=_compression(args.compression))
    _done(args.out)
    return 0


def run_import_ade20k(args: argparse.Namespace) -> int:
    from testbed.core.guards import check_outputs
    from testbed.data.importers import import_ade20k

    _check_out(args.out, args.force)
    check_outputs({"--out": args.out}, {"ROOT": args.root})
    import_ade20k(args.root, args.out, size=args.size, workers=args.workers, compression=_compression(args.compression))
    _done(args.out)
    return 0


def run_import_folder(args: argparse.Namespace) -> int:
    from testbed.core.guards import check_outputs
    from testbed.data.importers import import_folder

    _check_out(args.out, args.force)
    check_outputs({"--out": args.out}, {"ROOT": args.root, "--classes": args.classes})
    import_folder(args.root, args.classes, args.out, size=args.size, test_fraction=args.test_fraction, seed=args.seed,
                  workers=args.workers, compression=_compression(args.compression))
    _done(args.out)
    return 0


# -- info -----------------------------------------------------------------------------------------
def dataset_info(path: str | os.PathLike, stats: bool = True, show_progress: bool = True) -> dict:
    """Everything `testbed data info --json` prints, as a dict."""
    from testbed.data import h5data
    from testbed.data.stats import split_stats, trigger_fidelity

    with h5data.open_dataset(path) as f:
        arrays: dict[str, dict] = {name: {"shape": list(obj.shape), "dtype": obj.dtype.name,
                                          "chunks": list(obj.chunks) if obj.chunks else None,
                                          "compression": obj.compression} for name, obj in f.arrays().items()}
        order = ("train", "test", "test_attacked")
        names = sorted((n.rsplit("/", 1)[0] for n in arrays if n.endswith("/images")), key=lambda s: (s not in order, order.index(s) if s in order else 0, s))
        splits = {s: arrays[h5data.path(s, "images")]["shape"][0] for s in names}
        info: dict = {
            "path": str(path),
            "format": f.attrs["format"],
            "schema_version": int(f.attrs["schema_version"]),
            "content_sha256": f.content_hash(),
            "classes": f.classes,
            "num_classes": f.num_classes,
            "ignore_index": f.ignore_index,
            "image_size": list(f.image_size),
            "source": f.source,
            "splits": splits,
            "arrays": arrays,
            "attack": f.attack,
            "parent_sha256": f.attrs.get("parent_sha256"),
            "poison": None,
            "stats": None,
        }
        if f.is_poisoned and h5data.POISON_INDEX in f:
            n_poison = f.shape(h5data.POISON_INDEX)[0]
            n_train = f.length("train")
            attack = f.attack or {}
            info["poison"] = {
                "poisoned_samples": n_poison,
                "train_samples": n_train,
                "achieved_rate": n_poison / max(1, n_train),
                "requested_rate": attack.get("requested_rate", attack.get("rate")),
                "clean_subset": f.shape(h5data.CLEAN_INDEX)[0] if h5data.CLEAN_INDEX in f else None,
                "test_attacked": splits.get("test_attacked"),
                "test_benign": f.shape(h5data.TEST_BENIGN_INDEX)[0] if h5data.TEST_BENIGN_INDEX in f else None,
                "trigger_fidelity": trigger_fidelity(f),
            }
        if stats:
            info["stats"] = {s: split_stats(f, h5data.path(s, "labels"), show_progress).to_dict(f.classes)
                             for s in ("train", "test")}
    return info


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _print_info(info: dict) -> None:
    print(f"{info['path']}  ({info['format']} schema {info['schema_version']})")
    print(f"content sha256  {info['content_sha256']}")
    h, w = info["image_size"]
    print(f"images          {h}x{w}, {info['num_classes']} classes, ignore index {info['ignore_index']}")
    print("splits          " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()))
    print(f"source          {json.dumps(info['source'], sort_keys=True)}")
    for name, a in sorted(info["arrays"].items()):
        comp = a["compression"] or "uncompressed"
        print(f"  /{name:<24} {a['dtype']:<6} {'x'.join(map(str, a['shape'])):<16} chunks {a['chunks']} {comp}")
    if info["attack"] is not None:
        print(f"attack          {json.dumps(info['attack'], sort_keys=True)}")
        if info["parent_sha256"]:
            print(f"parent sha256   {info['parent_sha256']}")
        p = info["poison"]
        if p:
            req = p["requested_rate"]
            print(f"poisoned        {p['poisoned_samples']}/{p['train_samples']} training samples = {_pct(p['achieved_rate'])} achieved"
                  + (f" (requested {_pct(req)})" if isinstance(req, (int, float)) else ""))
            print(f"defender clean  {p['clean_subset']} samples; test_attacked {p['test_attacked']}, test_benign {p['test_benign']}")
            if p.get("trigger_fidelity"):
                from testbed.data.stats import fidelity_text
                print(f"trigger         {fidelity_text(p['trigger_fidelity'])}")
    stats = info["stats"]
    if stats:
        tr, te = stats["train"], stats["test"]
        print(f"\n{'class':<16}{'pixels train':>13}{'images train':>14}{'pixels test':>13}{'images test':>13}")
        for c in info["classes"]:
            print(f"{c:<16}{_pct(tr['pixel_share'][c]):>13}{_pct(tr['image_share'][c]):>14}"
                  f"{_pct(te['pixel_share'][c]):>13}{_pct(te['image_share'][c]):>13}")
        print(f"{'(ignore)':<16}{_pct(tr['ignore_share']):>13}{'':>14}{_pct(te['ignore_share']):>13}")
        pairs = ", ".join(f"{p['classes'][0]}+{p['classes'][1]} {_pct(p['share'])}" for p in tr["top_pairs"])
        print(f"\nmost co-occurring class pairs (share of train images; full matrix with --json):\n  {pairs or '-'}")


def run_info(args: argparse.Namespace) -> int:
    from testbed.core import progress

    info = dataset_info(args.path, stats=not args.no_stats, show_progress=progress.enabled())
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


# -- show -----------------------------------------------------------------------------------------
def sample_panels(path: str | os.PathLike, split: str, index: int) -> tuple[list[tuple[str, np.ndarray, bool]], list[str]]:
    """The panels `data show` draws: [(title, array, is_label)], and the class names."""
    from testbed.data import h5data

    with h5data.open_dataset(path, check_labels=False) as f:
        splits = [s for s in ("train", "test", "test_attacked") if h5data.path(s, "images") in f]
        if split not in splits:
            raise UserError(f"{path} has no split {split!r}; choose one of: {', '.join(splits)}")
        n = f.length(split)
        if not 0 <= index < n:
            raise UserError(f"--index {index} is out of range: the {split} split of {path} has {n} samples (0..{n - 1})")
        image = f.read(h5data.path(split, "images"), [index])[0]
        label = f.read(h5data.path(split, "labels"), [index])[0]
        if split == "test_attacked":
            gt = f.read(h5data.TEST_ATTACKED_GT, [index])[0]
            src = int(f.read(h5data.TEST_ATTACKED_INDEX, [index])[0]) if h5data.TEST_ATTACKED_INDEX in f else None
            panels = [(f"attacked image (test {src})" if src is not None else "attacked image", image, False),
                      ("ground truth", gt, True), ("target label", label, True)]
        elif split == "train" and h5data.POISON_INDEX in f:
            pidx = f[h5data.POISON_INDEX]
            hit = np.flatnonzero(pidx == index)
            if hit.size:
                k = int(hit[0])
                panels = [("benign image", f.read(h5data.ORIGINAL_IMAGES, [k])[0], False), ("poisoned image", image, False),
                          ("benign label", f.read(h5data.ORIGINAL_LABELS, [k])[0], True), ("target label", label, True)]
            else:
                panels = [("image (not poisoned)", image, False), ("label", label, True)]
        else:
            panels = [("image", image, False), ("label", label, True)]
        return panels, list(f.classes)


def draw_panels(panels: list[tuple[str, np.ndarray, bool]], classes: list[str], out: Path, title: str = "") -> None:
    """Draw panels side by side with a legend of the classes present; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from testbed.core.atomic import atomic_file
    from testbed.core.palette import colorize, palette

    k = len(classes)
    present = sorted(set(np.concatenate([np.unique(a) for _, a, is_label in panels if is_label]).tolist()))
    pal = palette(k)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, (name, arr, is_label) in zip(axes[0], panels):
        ax.imshow(colorize(arr, k) if is_label else arr, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [Patch(facecolor=pal[v] / 255.0, edgecolor="black", linewidth=0.3,
                     label=classes[v] if v < k else ("ignore" if v == 255 else f"id {v}?")) for v in present]
    axes[0][-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.03, 1.0), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    try:
        with atomic_file(out, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def run_show(args: argparse.Namespace) -> int:
    from testbed.core.guards import check_outputs

    _check_out(args.out)
    check_outputs({"--out": args.out}, {"the dataset": args.path})
    panels, classes = sample_panels(args.path, args.split, args.index)
    draw_panels(panels, classes, args.out, title=f"{args.path.name}  {args.split}[{args.index}]")
    print(f"wrote {args.out}")
    return 0
