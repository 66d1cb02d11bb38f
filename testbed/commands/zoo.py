"""`testbed zoo`: build a grid of backdoored (and benign) models from a TOML spec, list it, verify it."""

from __future__ import annotations

import argparse
from pathlib import Path

from testbed.core.errors import UserError

BUILD_EXAMPLES = """examples:
  testbed zoo build examples/zoo-small.toml --out zoo-small/
  testbed zoo build examples/zoo-small.toml --out zoo-small/ --workers auto     (one 1-thread process per core)
  ray start --head && testbed zoo build examples/zoo-paper.toml --out /shared/zoo --backend ray --ray-address HEAD:6379

Killed or interrupted? Run the same command again: finished entries are kept, unfinished ones resume
from their last epoch checkpoint, and two builders on one zoo never train the same entry."""
LS_EXAMPLES = """examples:
  testbed zoo ls zoo-small/
  testbed zoo ls zoo-small/ --json"""
VERIFY_EXAMPLES = """examples:
  testbed zoo verify zoo-small/          (exit 0: every file matches the manifest; 1: problems, one per line)
  testbed zoo verify zoo-small/ --public-key publisher.pub   (also: the manifest is signed by that key)
  testbed zoo verify my-rebuild/ --against docs/results/camvid/zoo/   (does my rebuild reproduce the published zoo?)"""
SIGN_EXAMPLES = """examples:
  openssl ecparam -name prime256v1 -genkey -noout -out zoo-key.pem && openssl ec -in zoo-key.pem -pubout -out zoo-key.pub
  testbed zoo sign zoo-small/ --private-key zoo-key.pem      (writes zoo-small/manifest.sig; publish zoo-key.pub)"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "zoo", help="build, list, verify and sign model zoos (models × attacks × seeds)",
        description="Model zoos (docs/zoo.md): a TOML spec names the data, training arguments, attacks and a grid; "
        "`build` trains every entry once (resumable, shareable across workers and Ray nodes), `ls` lists them, `sign` signs it, "
        "`verify` recomputes every checksum. Spec format: docs/zoo.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=BUILD_EXAMPLES.split("\n\n")[0] + "\n" + LS_EXAMPLES.split("\n", 1)[1] + "\n" + VERIFY_EXAMPLES.split("\n", 1)[1],
    )
    sub = p.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")

    b = sub.add_parser(
        "build", help="build (or finish) a zoo from a spec",
        description="Build every entry of a zoo spec into --out: the clean data once, each poisoned dataset once "
        "(shared by entries that use it), each model trained once and scored; a benign model is also scored on "
        "every attacked test set of the zoo. Writes --out/manifest.json as entries finish.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BUILD_EXAMPLES,
    )
    b.add_argument("spec", type=Path, help="zoo spec (.toml)")
    b.add_argument("--out", required=True, type=Path, help="zoo directory (created; an existing zoo is resumed)")
    b.add_argument("--workers", type=workers_arg, default=1,
                   help="local worker processes, or auto = usable cores / --threads (one per GPU on CUDA); "
                   "default 1: this process")
    b.add_argument("--threads", type=int, default=1,
                   help="torch threads per entry (default 1); fixed, so an entry's bytes do not depend on --workers")
    b.add_argument("--backend", choices=("local", "ray"), default="local", help="local processes or Ray tasks (default local)")
    b.add_argument("--ray-address", default=None, help="Ray cluster address, e.g. HEAD:6379 or auto (default: a local Ray instance)")
    b.add_argument("--device", default="auto", help="auto|cpu|cuda[:N] (default auto: CUDA when present)")
    b.add_argument("--stale-after", type=float, default=300.0,
                   help="seconds without a heartbeat after which another host's claim counts as abandoned (default 300)")
    b.set_defaults(func=run_build)

    ls = sub.add_parser("ls", help="list a zoo's entries with status and scores", description="List a zoo's entries: "
                        "id, model, attack, seed, status (done/running/partial/pending), mIoU-B, ASR, whether the "
                        "attack implanted (ASR at least --min-asr, and above the ASR the benign model of the same model, seed and "
                        "training settings scores on the same data, as `testbed bench` pairs them: NO GAIN otherwise), that "
                        "benign ASR (--json: and its entry), and the data file the entry was trained on.",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LS_EXAMPLES)
    ls.add_argument("zoo", type=Path, help="zoo directory")
    ls.add_argument("--json", action="store_true", help="print the rows as JSON")
    ls.add_argument("--min-asr", type=float, default=50.0, metavar="PCT",
                    help="an attacked entry whose ASR is below this did not implant: marked FAILED (default 50)")
    ls.set_defaults(func=run_ls)

    _register_verify(sub)
    _register_sign(sub)


def _register_verify(sub) -> None:
    v = sub.add_parser("verify", help="recompute every checksum of a zoo",
                       description="Recompute the sha256 of every file the zoo uses (datasets and their records, "
                       "plan.json, every entry file) and the manifest's own checksum; print each problem (mismatch, "
                       "missing file, unlisted or hidden file, leftover claim, symbolic link, path leaving the zoo, "
                       "malformed or tampered manifest, unfinished entry, benign entry with stale reference scores) and exit 1 if "
                       "there is any.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=VERIFY_EXAMPLES)
    v.add_argument("zoo", type=Path, help="zoo directory")
    v.add_argument("--public-key", "--trusted-key", dest="public_key", type=Path, metavar="PUB",
                   help="the publisher's public key (PEM): also require manifest.sig to be its signature of manifest.json")
    v.add_argument("--against", type=Path, metavar="PUBLISHED",
                   help="a published zoo's manifest.json (or its directory; no weights needed): once ZOO passes its "
                   "own check, compare every entry both finished — SAME (same settings, attack and data, "
                   "byte-identical weights and scores), MISMATCH (byte-identical weights, other published scores), "
                   "DIFFERS (same experiment, other weights: the score differences are printed) or OTHER (not the "
                   "same experiment: the first difference is named); exit 0 only when at least one entry was "
                   "compared and every compared entry is SAME")
    v.set_defaults(func=run_verify)


def _register_sign(sub) -> None:
    s = sub.add_parser("sign", help="sign a verified zoo's manifest with a private key",
                       description="Verify the zoo, then sign its manifest.json (which records the sha256 of every "
                       "file) with an ECDSA private key, writing ZOO/manifest.sig (OpenSSF model-signing, key mode, "
                       "offline). Whoever has the public key can then tell the zoo from a re-sealed copy: `testbed zoo "
                       "verify ZOO/ --public-key PUB`, `testbed bench --zoo ZOO/ --public-key PUB`.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SIGN_EXAMPLES)
    s.add_argument("zoo", type=Path, help="zoo directory")
    s.add_argument("--private-key", required=True, type=Path, metavar="KEY", help="PEM ECDSA private key (P-256 or larger)")
    s.set_defaults(func=run_sign)


def workers_arg(text: str) -> int | str:
    """``--workers N`` or ``--workers auto`` (resolved by the build, which knows --threads and --device)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def run_build(args: argparse.Namespace) -> int:
    from testbed.zoo.build import build

    result = build(args.spec, args.out, workers=args.workers, backend=args.backend, ray_address=args.ray_address,
                   device=args.device, threads=args.threads, stale_after=args.stale_after, progress=True, quiet=bool(getattr(args, "quiet", False)))
    if result.failed:
        print(f"testbed: {len(result.failed)} entr{'y' if len(result.failed) == 1 else 'ies'} failed "
              f"({', '.join(result.failed)}); fix the cause and run the same command again to finish the zoo")
        return 1
    return 0


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def run_ls(args: argparse.Namespace) -> int:
    import json

    from testbed.evaluation.attack_check import attack_status, check_min_asr
    from testbed.zoo import listed_floors
    from testbed.zoo import manifest as mf

    zoo = args.zoo
    if not zoo.is_dir():
        raise UserError(f"zoo {zoo} is not a directory; build one with `testbed zoo build SPEC.toml --out {zoo}`")
    min_asr = check_min_asr(args.min_asr, "--min-asr")
    m = mf.collect(zoo)  # live status, also while a build is running
    floors = listed_floors(m["entries"])  # bench's rule: same model, seed and training axes
    rows = []
    for e in m["entries"]:
        metrics = e.get("metrics") or {}
        implanted = attack_status(e["is_benign"], metrics.get("ASR"), min_asr) if e["status"] == "done" else "-"
        floor = floors.get(e["id"]) or {}
        ref = floor.get("ASR")
        if implanted == "implanted" and ref is not None and metrics["ASR"] <= ref:
            implanted = f"NO GAIN (benign {ref:.1f}%)"  # the benign model scores as high: no backdoor is measured
        rows.append({"id": e["id"], "model": e["model"], "attack": e["attack_id"], "seed": e["seed"],
                     "status": e["status"], "mIoU-B": metrics.get("mIoU-B"), "ASR": metrics.get("ASR"),
                     "benign_ASR": ref, "benign_entry": floor.get("entry"), "implanted": implanted,
                     "data": e.get("data")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ["id", "model", "attack", "seed", "status", "data", "implanted", "mIoU-B", "ASR", "benign ASR"]
    table = [[r["id"], r["model"], r["attack"], str(r["seed"]), r["status"], r["data"] or "-", r["implanted"],
              _fmt(r["mIoU-B"]), _fmt(r["ASR"]), _fmt(r["benign_ASR"])] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
    right = {3, 7, 8, 9}
    for line in [head, *table]:
        print("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip())
    done = sum(r["status"] == "done" for r in rows)
    print(f"{done}/{len(rows)} entries done")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from testbed.zoo import manifest as mf, reproduce

    zoo = args.zoo
    if not zoo.is_dir():
        raise UserError(f"zoo {zoo} is not a directory; give the --out directory of `testbed zoo build`")
    if args.public_key is not None:
        from testbed.zoo.signing import key_file

        key_file(args.public_key, "--public-key")  # a missing key is a usage error, before any hashing
    published = reproduce.load_published(args.against) if args.against is not None else None
    problems, manifest = mf.verify(zoo)
    if args.public_key is not None and manifest is not None:
        from testbed.zoo.signing import signature_problem

        problem = signature_problem(zoo, args.public_key)
        problems = problems + ([problem] if problem is not None else [])
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        print(f"zoo {zoo}: {len(problems)} problem(s)")
        return 1
    # the comparison first: a manifest it cannot compare is one error line, not a half-printed report
    lines, reproduced = reproduce.verdict(manifest, published, args.against) if published is not None else ([], True)
    n_files = (sum(len(e.get("files") or {}) for e in manifest["entries"]) + len(manifest["datasets"])
               + len(manifest.get("records") or {}))
    print(f"zoo {zoo}: OK, {len(manifest['entries'])} entries, {n_files} files verified; "
          f"manifest sha256 {mf.file_sha256(zoo / mf.MANIFEST)}" + ("; signed by the --public-key" if args.public_key else ""))
    for line in lines:
        print(line)
    return 0 if reproduced else 1


def run_sign(args: argparse.Namespace) -> int:
    from testbed.zoo import manifest as mf
    from testbed.zoo.signing import key_file, sign

    zoo = args.zoo
    if not zoo.is_dir():
        raise UserError(f"zoo {zoo} is not a directory; give the --out directory of `testbed zoo build`")
    key_file(args.private_key, "--private-key")
    problems, _ = mf.verify(zoo)
    if problems:
        raise UserError(f"zoo {zoo} does not verify ({problems[0]}{' and more' if len(problems) > 1 else ''}); "
                        f"a signature would vouch for it: run `testbed zoo verify {zoo}` and fix it first")
    path = sign(zoo, args.private_key)
    print(f"zoo {zoo}: signed {mf.MANIFEST} (sha256 {mf.file_sha256(zoo / mf.MANIFEST)}) into {path}")
    return 0
