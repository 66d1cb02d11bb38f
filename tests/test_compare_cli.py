"""`testbed compare REPORT/ --defense A --vs B`: the answer's format, its JSON, refusals, and a real tiny report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from testbed.cli import main
from testbed.defense import DefenseResult
from testbed.stats import compare
from test_stats import noop_oracle_rows

ME = __name__


def write_report(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    doc = {"format": "segbackdoor-bench", "version": 1, "meta": {}, "rows": rows, "verdicts": []}
    (path / "results.json").write_text(json.dumps(doc))
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_compare_prints_one_line_per_metric(tmp_path, capsys):
    rows = noop_oracle_rows()
    report = write_report(tmp_path / "r", rows)
    assert main(["compare", str(report), "--defense", "oracle", "--vs", "noop"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["DER", "ASR_after", "mIoU-B_after"]
    d = np.array([r["DER"] for r in rows if r["defense"] == "oracle"]) - 0.5
    lo, hi = sps.t.interval(0.95, d.size - 1, loc=d.mean(), scale=sps.sem(d))
    assert lines[0] == f"oracle − noop: DER +{d.mean():.3f} [+{lo:.3f}, +{hi:.3f}], n=12 models, p=0.00049"
    assert lines[1].startswith("oracle − noop: ASR_after −") and " pp [" in lines[1]


def test_compare_json_is_the_library_result(tmp_path, capsys):
    rows = noop_oracle_rows()
    report = write_report(tmp_path / "r", rows)
    assert main(["compare", str(report), "--defense", "noop", "--vs", "none", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads(json.dumps(compare(rows, "noop", "none")))
    assert got["metrics"]["DER"]["mean"] == 0.0 and got["metrics"]["DER"]["p"] == 1.0


def _report_without_rows(tmp: Path) -> Path:
    return write_report(tmp / "r", [])


def _invalid_json(tmp: Path) -> Path:
    (tmp / "r").mkdir()
    (tmp / "r" / "results.json").write_text("{not json")
    return tmp / "r"


def _truncated(tmp: Path) -> Path:
    report = write_report(tmp / "r", noop_oracle_rows(3))
    text = (report / "results.json").read_text()
    (report / "results.json").write_text(text[: len(text) // 2])  # a write cut short
    return report


def _not_an_object(tmp: Path) -> Path:
    (tmp / "r").mkdir()
    (tmp / "r" / "results.json").write_text("[1, 2]")
    return tmp / "r"


def _other_json(tmp: Path) -> Path:
    (tmp / "r").mkdir()
    (tmp / "r" / "results.json").write_text(json.dumps({"rows": []}))
    return tmp / "r"


def _no_results(tmp: Path) -> Path:
    (tmp / "r").mkdir()
    (tmp / "r" / "report.md").write_text("# x\n")
    return tmp / "r"


def _disjoint(tmp: Path) -> Path:
    rows = [r for r in noop_oracle_rows(4) if r["defense"] == "oracle"]
    rows += [{**r, "model": r["model"] + "-other", "defense": "noop"} for r in rows]
    return write_report(tmp / "r", rows)


@pytest.mark.parametrize("make,args,message", [
    (lambda t: t / "missing", ["--defense", "oracle", "--vs", "noop"], "does not exist"),
    (_no_results, ["--defense", "oracle", "--vs", "noop"], "has no results.json"),
    (_invalid_json, ["--defense", "oracle", "--vs", "noop"], "r/results.json: not valid JSON"),
    (_truncated, ["--defense", "oracle", "--vs", "noop"], "r/results.json: not valid JSON"),
    (_not_an_object, ["--defense", "oracle", "--vs", "noop"], "r/results.json does not hold a JSON object; rerun"),
    (_other_json, ["--defense", "oracle", "--vs", "noop"], "is not a bench report"),
    (_report_without_rows, ["--defense", "oracle", "--vs", "noop"], "has no rows"),
    (lambda t: write_report(t / "r", noop_oracle_rows(3)), ["--defense", "orcale", "--vs", "noop"],
     "--defense 'orcale' is not in"),
    (lambda t: write_report(t / "r", noop_oracle_rows(3)), ["--defense", "oracle", "--vs", "nop"],
     "it has: noop, oracle, noop-twin (or none)"),
    (lambda t: write_report(t / "r", noop_oracle_rows(3)), ["--defense", "oracle", "--vs", "oracle"], "both 'oracle'"),
    (_disjoint, ["--defense", "oracle", "--vs", "noop"], "share no models"),
])
def test_compare_refuses_bad_input_with_one_line(tmp_path, capsys, make, args, message):
    report = make(tmp_path)
    before = tree(tmp_path)
    rc = main(["compare", str(report), *args])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("testbed: error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert tree(tmp_path) == before  # nothing written, nothing changed


# -- end to end on a real (tiny) report --------------------------------------------------------------

class DarkFilter:
    """Rejects images with many near-black pixels (the line trigger is black)."""

    name = "dark-filter"

    @staticmethod
    def score(images):
        return (np.asarray(images).min(-1) < 30).mean(axis=(1, 2)).astype(np.float64)

    def run(self, model, ctx):
        return DefenseResult(input_scores=self.score, threshold=float(np.quantile(self.score(ctx.clean_images), 0.9)))


class NoOp:
    """Hands the model back unchanged: after = before, DER 0.5."""

    name = "no-op"

    def run(self, model, ctx):
        return DefenseResult(model=model)


def test_compare_on_a_real_bench_report(backdoored_run, fgba_line_path, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["-q", "bench", "--run", str(backdoored_run), "--data", str(fgba_line_path), "--defense",
               f"{ME}:DarkFilter,{ME}:NoOp", "--device", "cpu", "--no-figures", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    rows = {r["defense"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert all("benign_floor" not in r for r in rows.values())  # --run: no zoo, no benign floor (issue 24)
    before = tree(out)

    assert main(["compare", str(out), "--defense", "no-op", "--vs", "none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "no-op − none: DER +0.000, n=1 model, no interval"

    assert main(["compare", str(out), "--defense", "dark-filter", "--vs", "no-op", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["models"] == 1 and got["metrics"]["DER"]["lo"] is None
    assert got["metrics"]["DER"]["mean"] == pytest.approx(rows["dark-filter"]["DER"] - rows["no-op"]["DER"], abs=1e-12)
    assert got["metrics"]["ASR_after"]["mean"] == pytest.approx(
        rows["dark-filter"]["after"]["ASR"] - rows["no-op"]["after"]["ASR"], abs=1e-12)
    assert tree(out) == before


# -- issue 24, traps 7-9: the command line a user types ------------------------------------------------

def test_a_reader_that_leaves_early_gets_no_false_disk_error(tmp_path):
    """`compare ... --json | head`: the reader has gone before the answer is written; no "Broken pipe; check the
    path..." line, the shell's SIGPIPE status."""
    import os
    import subprocess
    import sys

    report = write_report(tmp_path / "r", noop_oracle_rows())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "compare", str(report), "--defense", "oracle",
                             "--vs", "noop", "--json"], cwd=Path(__file__).parents[1], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


@pytest.mark.parametrize("argv, needle", [
    (["compare", "R", "--defence", "a", "--vs", "b"], "unrecognized option --defence (did you mean '--defense'?)"),
    (["bench", "--zoo", "z", "--entires", "*s0", "--defense", "strip", "--out", "o"],
     "testbed bench: error: unrecognized option --entires (did you mean '--entries'?); see `testbed bench --help`"),
    (["bench", "--zoo", "z", "--min-as", "30", "--defense", "strip", "--out", "o"],  # no silent prefix match
     "unrecognized option --min-as (did you mean '--min-asr'?)"),
])
def test_a_misspelled_flag_gets_did_you_mean_from_its_command(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1 and "required" not in err


def test_quiet_goes_before_or_after_the_subcommand(tmp_path, capsys):
    from testbed.core import progress

    report = write_report(tmp_path / "r", noop_oracle_rows())
    for argv in (["-q", "compare", str(report), "--defense", "oracle", "--vs", "noop"],
                 ["compare", str(report), "--defense", "oracle", "--vs", "noop", "-q"]):
        progress.set_quiet(False)
        assert main(argv) == 0 and not progress.active()
        progress.set_quiet(False)


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys):
    import testbed.commands.bench as bench_cmd
    import testbed.commands.compare as compare_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_cmd, "run", interrupted)
    monkeypatch.setattr(compare_cmd, "run", interrupted)
    assert main(["bench", "--zoo", "z", "--defense", "strip", "--out", "o"]) == 130
    assert capsys.readouterr().err == ("testbed: interrupted; run the same command again to resume (finished pairs "
                                       "are kept)\n")
    assert main(["compare", "r", "--defense", "a", "--vs", "b"]) == 130  # nothing to resume
    assert capsys.readouterr().err == "testbed: interrupted\n"


# -- issue 24 (walkthrough): "DER no pairs with values" said nothing about why --------------------------

def _not_implanted_rows(benign: int = 0) -> list[dict]:
    """Two defenses on 3 backdoored models whose attack did not implant (DER n/a), plus ``benign`` benign models."""
    from test_stats import make_row

    rows = []
    for i in range(3):
        before = {"ASR": 20.0 + i, "mIoU-B": 50.0 + i}
        for d, after in (("blur", {"ASR": 10.0 + i, "mIoU-B": 48.0}), ("ft", {"ASR": 15.0, "mIoU-B": 47.0 - i})):
            rows.append({**make_row(f"m--fgba--s{i}", d, before, after), "DER": None, "attack_implanted": False})
    for i in range(benign):
        before = {"ASR": None, "mIoU-B": 60.0 + i}
        for d in ("blur", "ft"):
            rows.append({**make_row(f"m--benign--s{i}", d, before, {"ASR": None, "mIoU-B": 58.0 + i}),
                         "benign_model": True})
    return rows


def test_no_der_pairs_says_why_on_the_command_line_and_in_the_report(tmp_path, capsys):
    from testbed.bench.markdown import statistics_sections
    from testbed.stats import bench_statistics

    rows = _not_implanted_rows()
    report = write_report(tmp_path / "r", rows)
    assert main(["compare", str(report), "--defense", "blur", "--vs", "ft"]) == 0
    lines = capsys.readouterr().out.splitlines()
    why = "the attack did not implant on any model both defenses ran on (DER n/a: no backdoor to remove)"
    assert lines[0] == f"blur − ft: DER: no pairs with values — {why}"
    d = np.array([10.0, 11.0, 12.0]) - 15.0  # the ASR after still has its three pairs
    assert lines[1].startswith(f"blur − ft: ASR_after {d.mean():+.2f}".replace("-", "−")) and "n=3 models" in lines[1]
    md = "\n".join(statistics_sections(bench_statistics(rows)))
    assert f"| blur − ft | 3 | no pairs with values — {why} |" in md  # the report's comparisons cell, same words
    assert f"| blur − none | 3 | no pairs with values — {why} |" in md


def test_no_der_pairs_counts_each_reason_when_they_mix(tmp_path, capsys):
    rows = _not_implanted_rows(benign=2)
    got = compare(rows, "blur", "ft")["metrics"]
    assert got["DER"]["n"] == 0 and got["DER"]["why"] == ("of the 5 models both defenses ran on: 3 the attack did not "
                                                          "implant (DER n/a), 2 no attacked test set (a benign model)")
    assert got["mIoU-B_after"]["n"] == 5 and "why" not in got["mIoU-B_after"]
    failed = [{**r, "error": "RuntimeError: boom"} if r["defense"] == "ft" else r for r in _not_implanted_rows()]
    rows = failed + [{**make, "model": make["model"] + "x"} for make in _not_implanted_rows()]  # 3 more that ran
    assert compare(rows, "blur", "ft")["metrics"]["DER"]["why"] == (
        "of the 6 models both defenses ran on: 3 one of the two defenses failed, 3 the attack did not implant (DER n/a)")


def test_no_der_pairs_names_the_benign_floor_when_that_is_why():
    """A zoo bench's no-gain rows (ASR before above --min-asr, not above the benign model's): their own words."""
    rows = [{**r, "before": {**r["before"], "ASR": 80.5}, "settings": {"min_asr": 50.0},
             "benign_floor": {"entry": "m--benign--s0", "ASR": 83.7}} for r in _not_implanted_rows()]
    assert compare(rows, "blur", "ft")["metrics"]["DER"]["why"] == (
        "no model both defenses ran on scores an ASR above the zoo's benign model on the same attacked test set "
        "(DER n/a: no backdoor is measured)")
    rows[0:2] = [{**r, "before": {**r["before"], "ASR": 20.0}} for r in rows[0:2]]  # model s0: below --min-asr
    assert compare(rows, "blur", "ft")["metrics"]["DER"]["why"] == (
        "of the 3 models both defenses ran on: 1 the attack did not implant (DER n/a), 2 no gain over the zoo's "
        "benign model (DER n/a)")
