"""The user-facing docs cannot drift from the code: every command they show parses, the CI example installs
from a path (not from a repository URL) and passes the suites only options the plugin registers, and no page or
`--help` text cites the design spec, which is not shipped.

The expectations are collected independently of what is checked: the suite's options by reading the
``addoption`` calls in ``suites/plugin.py`` (its source, not the running plugin), pytest's own options from
pytest's parser without plugins, and the CLI's options from its real argument parser.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "ci" / "robustness.yml"
# pages whose commands are checked; every docs page is checked for spec citations
COMMAND_PAGES = (ROOT / "README.md", *(ROOT / "docs" / f"{name}.md" for name in
                                        ("suites", "zoo", "defenses", "writing-a-defense", "data-format")))
SPEC_CITATION = re.compile(r"SPEC\s*§")


def _workflow_lines() -> list[str]:
    """The shell lines of the workflow's `run:` steps (PyYAML when installed, else the text after `run:`)."""
    text = WORKFLOW.read_text()
    try:
        import yaml
    except ImportError:  # plain text: `run: CMD` lines and the lines of `run: |` blocks
        lines, block = [], False
        for raw in text.splitlines():
            s = raw.strip().removeprefix("- ")
            if s.startswith("run:"):
                rest = s[len("run:"):].strip()
                block = rest == "|"
                if not block:
                    lines.append(rest)
            elif block and s and not s.startswith(("- ", "#")) and ":" not in s.split()[0]:
                lines.append(s)
            else:
                block = block and bool(s)
        return lines
    doc = yaml.safe_load(text)
    runs = [step["run"] for job in doc["jobs"].values() for step in job["steps"] if "run" in step]
    return [line.strip() for run in runs for line in run.splitlines() if line.strip()]


def _words(line: str) -> list[str]:
    """A shell line's words, without a trailing comment."""
    return shlex.split(line, comments=True)


def _doc_commands(path: Path, program: str) -> tuple[list[str], list[str]]:
    """Commands starting with ``program`` in a markdown page: (lines of fenced blocks, inline code spans).

    A fenced line is a command to run; a code span may be a command or a mention (`testbed defend --param`).
    """
    text = path.read_text()
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    lines = [line.strip() for block in fenced for line in block.replace("\\\n", " ").splitlines()]  # joins `\` continuations
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    synopsis = ("[", "...", "|")  # a usage synopsis, not a command to run

    def keep(found: list[str]) -> list[str]:
        return [c for c in found if c.startswith(program + " ") and not any(m in c for m in synopsis)]

    return keep(lines), keep(spans)


@lru_cache(maxsize=1)
def _suite_options() -> frozenset[str]:
    """The options ``suites/plugin.py`` registers, read from its source."""
    tree = ast.parse((ROOT / "suites" / "plugin.py").read_text())
    return frozenset(a.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                     and isinstance(node.func, ast.Attribute) and node.func.attr == "addoption"
                     for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--"))


@lru_cache(maxsize=1)
def _pytest_options() -> frozenset[str]:
    """pytest's own options (aliases such as --junitxml included), from a config with only its built-in plugins:
    ``get_config`` loads no entry-point plugin, so the segbackdoor suites' options are not among them."""
    from _pytest.config import get_config

    parser = get_config()._parser
    return frozenset(n for group in [parser._anonymous, *parser._groups] for opt in group.options for n in opt.names())


def _pytest_flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


def test_the_option_readers_see_what_they_should():
    # guards for the two readers below: the suite's options are not pytest's, and both sets are non-trivial
    suite, core = _suite_options(), _pytest_options()
    assert {"--defense", "--zoo", "--max-asr", "--defense-param", "--min-tpr"} <= suite
    assert {"--pyargs", "--junitxml", "--maxfail"} <= core
    assert not suite & core


def test_workflow_reader_without_pyyaml_sees_the_same_commands(monkeypatch):
    pytest.importorskip("yaml")
    with_yaml = [_words(line) for line in _workflow_lines()]
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now raises ImportError
    assert [_words(line) for line in _workflow_lines()] == with_yaml
    assert any(w[:1] == ["pytest"] for w in with_yaml) and any(w[:2] == ["pip", "install"] for w in with_yaml)


def test_ci_example_installs_from_a_path_not_a_repository_url():
    installs = [line for line in _workflow_lines() if re.search(r"\bpip\b.*\binstall\b", line)]
    assert installs, "the workflow installs nothing"
    for line in installs:
        assert "github.com/" not in line and "git+" not in line, line
    # segbackdoor itself comes from a wheel file (or a checkout): a path, not a name on an index
    assert any(re.search(r"(\./|/)\S*segbackdoor-\S*\.whl", line) for line in installs), installs


def test_ci_example_passes_the_suite_only_options_it_registers():
    runs = [_words(line) for line in _workflow_lines()]
    suites = [w for w in runs if w[:1] == ["pytest"] or w[:3] == ["python", "-m", "pytest"]]
    assert suites, "the workflow runs no suite"
    for words in suites:
        assert "--pyargs" in words and "testbed.suites" in words, words
        unknown = [f for f in _pytest_flags(words) if f not in _suite_options() | _pytest_options()]
        assert not unknown, f"not options of pytest or of suites/plugin.py: {unknown}"
        assert "--defense" in words and "--zoo" in words, words


@pytest.mark.parametrize("page", COMMAND_PAGES, ids=lambda p: p.name)
def test_suite_commands_in_docs_use_registered_options(page):
    for command in sum(_doc_commands(page, "pytest"), []):
        unknown = [f for f in _pytest_flags(_words(command)) if f not in _suite_options() | _pytest_options()]
        assert not unknown, f"{page.name}: {command!r}: not options of pytest or of suites/plugin.py: {unknown}"


def _parses(argv: list[str]) -> str | None:
    """None when the testbed CLI's parser accepts ``argv``, else what it printed."""
    import contextlib
    import io

    from testbed.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip()
    return None


def _unknown_flags(argv: list[str]) -> str | None:
    """For a command mentioned in prose: None when its (sub)command exists and takes every --flag given."""
    import argparse

    from testbed.cli import build_parser

    parser, path = build_parser(), ["testbed"]
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if word.startswith("-") or not subs or word not in subs[0].choices:
            break
        parser, path = subs[0].choices[word], path + [word]
    if path == ["testbed"]:
        return f"no command {argv[:1]}"
    known = {o for a in parser._actions for o in a.option_strings}
    unknown = [f for f in _pytest_flags(argv) if f not in known]
    return f"`{' '.join(path)}` has no {unknown}" if unknown else None


@pytest.mark.parametrize("source", [*COMMAND_PAGES, WORKFLOW], ids=lambda p: p.name)
def test_testbed_commands_shown_parse(source):
    """Commands to run (workflow lines, fenced blocks) parse in full; commands in prose name real flags."""
    if source == WORKFLOW:
        run, mentioned = [line for line in _workflow_lines() if line.startswith("testbed ")], []
    else:
        run, mentioned = _doc_commands(source, "testbed")
    assert run or mentioned, f"no testbed command found in {source.name}"
    for command in run:
        problem = _parses(_words(command)[1:])
        assert problem is None, f"{source.name}: {command!r}: {problem}"
    for command in mentioned:
        problem = _unknown_flags(_words(command)[1:])
        assert problem is None, f"{source.name}: {command!r}: {problem}"


def test_the_command_checks_can_fail():
    assert _parses(["zoo", "build", "z.toml", "--out", "z", "--no-such-flag"]) is not None
    assert _parses(["zoo", "build", "z.toml", "--out", "z", "--workers", "auto"]) is None
    assert _unknown_flags(["defend", "--param"]) is None and _unknown_flags(["zoo", "build"]) is None
    assert _unknown_flags(["defend", "--no-such-flag"]) is not None and _unknown_flags(["nosuch"]) is not None


def _help_texts() -> dict[str, str]:
    """`testbed --help` and the --help of every command and subcommand, from the real parser."""
    import argparse

    from testbed.cli import build_parser

    out, todo = {}, [("testbed", build_parser())]
    while todo:
        name, parser = todo.pop()
        out[name] = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return out


def test_docs_and_help_do_not_cite_the_spec():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    cited = [f"{p.relative_to(ROOT)}:{i}" for p in pages for i, line in enumerate(p.read_text().splitlines(), 1)
             if SPEC_CITATION.search(line)]
    helps = _help_texts()
    assert {"testbed zoo build", "testbed bench", "testbed data synth"} <= set(helps)
    cited += [f"`{name} --help`" for name, text in helps.items() if SPEC_CITATION.search(text)]
    suite_doc = ast.get_docstring(ast.parse((ROOT / "suites" / "test_robustness.py").read_text())) or ""
    cited += ["suites/test_robustness.py docstring"] if SPEC_CITATION.search(suite_doc) else []
    assert not cited, f"cite docs pages, not the spec (not shipped): {cited}"


@pytest.mark.parametrize("page", ["attacks.md", "zoo.md"])
def test_attack_and_trigger_tables_are_the_generated_ones(page):
    """docs/attacks.md and docs/zoo.md hold the registries' tables verbatim (every built-in attack and trigger, every
    key), as docs/defenses.md holds `testbed defenses --markdown`."""
    from testbed.attacks.registry import BUILTIN, params_doc
    from testbed.attacks.triggers import TRIGGERS
    from testbed.commands.poison import markdown_tables

    text = (Path(__file__).parents[1] / "docs" / page).read_text(encoding="utf-8")
    begin = text.index("<!-- generated from the attack and trigger registries")
    body = text[text.index("\n", begin) + 1:text.index("<!-- end of generated tables -->")]
    assert body == markdown_tables()
    for name, cls in BUILTIN.items():  # the generated text itself names each attack and each of its keys
        assert f"| `{name}` |" in body and all(f"`{p.key_for(k)}`" in body for k, p in params_doc(cls).items())
    assert all(f"`{t}" in body for t in TRIGGERS) and "`blended[:A]`" in body and "`semantic:CLASS`" in body
