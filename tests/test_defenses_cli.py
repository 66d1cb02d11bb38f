"""`testbed defenses` (every defense with its parameters, from the classes) and the one parameter syntax."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from testbed.cli import main
from testbed.defenses.registry import BUILTIN, load_defense, parse_params
from testbed.core.errors import UserError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "defenses.md"


class Plugged:
    """A plugin defense with two parameters."""

    name = "plugged"
    params_doc = {"k": "how many neighbours"}

    def __init__(self, k: int = 3, mode: str = "fast"):
        self.k, self.mode = k, mode

    def run(self, model, ctx):  # pragma: no cover - never run here
        raise NotImplementedError


def _plugin(tmp_path, monkeypatch):
    dist = tmp_path / "plugins" / "plugged-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugged\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[testbed.defenses]\nplugged = {__name__}:Plugged\nbroken = no_such_module:X\n")
    monkeypatch.syspath_prepend(str(dist.parent))


def test_defenses_lists_every_builtin_parameter_with_its_default(capsys):
    assert main(["defenses", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(BUILTIN) <= set(records)
    for name, cls in BUILTIN.items():
        sig = inspect.signature(cls.__init__)
        expected = {p: json.dumps(v.default) if isinstance(v.default, (str, bool, type(None))) else repr(v.default)
                    for p, v in list(sig.parameters.items())[1:]}
        got = {p["name"]: p["default"] for p in records[name]["params"]}
        assert got == expected, name
        assert records[name]["summary"] and records[name]["source"] == "built-in"
        docs = getattr(cls, "params_doc", {}) or {}
        for p in records[name]["params"]:  # the help is the class's own words
            assert p["help"] == str(docs.get(p["name"], p["help"])) and p["help"], (name, p["name"])
    ts = {p["name"]: p for p in records["trigger-synthesis"]["params"]}
    assert ts["max_candidates"]["default"] == "null"
    assert records["activation-clustering"]["uses_training_set"] is True
    assert main(["defenses"]) == 0
    text = capsys.readouterr().out
    assert "max_candidates = null" in text and "n_overlays = 100" in text


def test_defenses_lists_plugins_and_their_load_errors(tmp_path, monkeypatch, capsys):
    _plugin(tmp_path, monkeypatch)
    assert main(["defenses", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    plugged = records["plugged"]
    assert plugged["source"] == f"plugin {__name__}:Plugged" and plugged["summary"] == "A plugin defense with two parameters."
    assert plugged["params"] == [{"name": "k", "default": "3", "help": "how many neighbours"},
                                 {"name": "mode", "default": '"fast"', "help": ""}]
    assert "failed to load" in records["broken"]["error"]


def test_every_builtin_names_its_paper_and_reference_code(capsys):
    for name, cls in BUILTIN.items():
        for attr in ("paper", "reference"):
            value = getattr(cls, attr, None)
            assert isinstance(value, str) and value.strip(), (name, attr)
    assert main(["defenses"]) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    for name, cls in BUILTIN.items():
        block = next(b for b in blocks if b.startswith(f"{name} (built-in"))
        assert f"\n  paper: {cls.paper}\n" in block and f"\n  reference code: {cls.reference}\n" in block, name
    assert main(["defenses", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n: (records[n]["paper"], records[n]["reference"]) for n in BUILTIN} == {
        n: (c.paper, c.reference) for n, c in BUILTIN.items()}
    assert main(["defenses", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert all(f"- paper: {c.paper}\n- reference code: {c.reference}\n" in md for c in BUILTIN.values())


def test_a_plugin_without_paper_or_reference_is_listed(tmp_path, monkeypatch, capsys):
    _plugin(tmp_path, monkeypatch)
    assert main(["defenses", "--json"]) == 0
    plugged = {r["name"]: r for r in json.loads(capsys.readouterr().out)}["plugged"]
    assert plugged["paper"] is None and plugged["reference"] is None
    assert main(["defenses"]) == 0
    block = next(b for b in capsys.readouterr().out.split("\n\n") if b.startswith("plugged ("))
    assert "paper:" not in block and "reference code:" not in block and "k = 3" in block
    assert main(["defenses", "--markdown"]) == 0
    md = capsys.readouterr().out
    section = md[md.index("### `plugged`"):]
    assert section.split("\n\n")[2].startswith("| parameter |")


def test_docs_list_every_parameter_as_generated():
    """docs/defenses.md holds `testbed defenses --markdown` for the built-ins, so no parameter is missing."""
    from testbed.commands.defenses import describe, markdown

    text = DOCS.read_text()
    builtins = [r for r in describe() if r["source"] == "built-in"]
    assert markdown(builtins) in text
    for name, cls in BUILTIN.items():
        for p in list(inspect.signature(cls.__init__).parameters)[1:]:
            assert re.search(rf"\| `{p}` \|", text), (name, p)


def test_one_parameter_syntax():
    names = ["strip", "pkg.mod:Cls"]
    assert parse_params(["strip.n_overlays=16", "pkg.mod:Cls.k=[3, 5]", "pkg.mod:Cls.mode=fast"], names) == {
        "strip": {"n_overlays": 16}, "pkg.mod:Cls": {"k": [3, 5], "mode": "fast"}}
    assert parse_params(["k=3", "pkg.mod:Cls.mode=null"], ["pkg.mod:Cls"]) == {"pkg.mod:Cls": {"k": 3, "mode": None}}
    with pytest.raises(UserError, match="2 defenses are given, so name the one"):
        parse_params(["k=3"], names)
    with pytest.raises(UserError, match="given twice"):
        parse_params(["k=3", "strip.k=4"], ["strip"])
    with pytest.raises(UserError, match=r"--defense-param 'x': write it as DEFENSE\.KEY=VALUE"):
        parse_params(["x"], ["strip"], flag="--defense-param")
    with pytest.raises(UserError, match="'other' is not one of the --defense names"):
        parse_params(["other.k=1"], ["strip"])


def test_unknown_parameter_names_the_known_ones():
    with pytest.raises(UserError, match=r"has no parameter 'n_overlay' \(did you mean 'n_overlays'\?\); its parameters: "
                                        r"n_overlays, fraction"):
        load_defense("strip", n_overlay=3)
    assert load_defense("strip", n_overlays=3).n_overlays == 3
