"""The documentation: README.md and docs/*.md (the mkdocs site).

- every command shown (```bash blocks, and inline `python ...` spans) names a script that exists and only flags its
  parser accepts, and every --yaml_path it names exists. The parser is the script's own: the script runs in this
  process with argparse's parse_known_args replaced by a hook that hands back the parser it was called on, so
  nothing is trained and no subprocess is spawned;
- the README stays short (at most 260 lines);
- every relative link and image points at an existing file, and every #anchor at a heading of its target page;
- `mkdocs build --strict` passes (skipped when mkdocs is not installed; CI runs it directly in .ci/run).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))
README_MAX_LINES = 260
# flags a script handles itself before its parser (python -m bdsafety.demo --seeds picks the three-seed study)
EXTRA_FLAGS = {"-m bdsafety.demo": {"--seeds"}}


# ----------------------------------------------------------------------------------------------------------- parsing
def _split_fences(text: str):
    """(bash blocks, prose) of a markdown text: the bodies of ```bash blocks, and everything outside any fence."""
    blocks, prose, cur, lang = [], [], None, None
    for line in text.splitlines():
        m = re.match(r"^\s*```(\S*)", line)
        if m:
            if cur is None:
                cur, lang = [], m.group(1)
            else:
                if lang in ("bash", "sh", "shell"):
                    blocks.append("\n".join(cur))
                cur = None
            continue
        if cur is None:
            prose.append(line)
        else:
            cur.append(line)
    return blocks, "\n".join(prose)


def _segments(line: str) -> list[list[str]]:
    """Shell words of one command line, split at ; && || | & and ( ): one list per simple command."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out, cur = [], []
    for tok in lex:
        if tok and all(c in "();<>|&" for c in tok):
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    out.append(cur)
    return [s for s in out if s]


def _python_commands(words: list[str]):
    """('script.py' or '-m module', [flags], yaml_path or None) for a `python ...` simple command."""
    for i, w in enumerate(words):
        if w not in ("python", "python3"):
            continue
        rest = words[i + 1:]
        if rest[:1] == ["-m"] and len(rest) > 1 and rest[1].startswith("bdsafety"):
            target, args = f"-m {rest[1]}", rest[2:]
        elif rest and rest[0].endswith(".py"):
            target, args = rest[0], rest[1:]
        else:
            return None
        flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
        yaml = None
        for j, a in enumerate(args):
            if a == "--yaml_path" and j + 1 < len(args):
                yaml = args[j + 1]
            elif a.startswith("--yaml_path="):
                yaml = a.split("=", 1)[1]
        return target, flags, yaml
    return None


def documented_commands():
    """[(page, command text, target, flags, yaml_path)] of every python command shown in the pages."""
    found = []
    for page in PAGES:
        blocks, prose = _split_fences(page.read_text())
        lines = []
        for b in blocks:
            lines += b.replace("\\\n", " ").splitlines()
        # inline code spans of prose that are whole commands (markdown lets a span run over a line break)
        lines += [m.group(1) for m in re.finditer(r"`(python3? [^`]+)`", prose.replace("\n", " "))]
        for line in lines:
            if "python" not in line or line.lstrip().startswith("#"):
                continue
            # a pattern (`python defense/<name>.py ...`), not a command
            if re.search(r"<[a-z_]+>", line.split("#", 1)[0]):
                continue
            for words in _segments(line):
                cmd = _python_commands(words)
                if cmd:
                    found.append((page.relative_to(ROOT).as_posix(), line.strip(), *cmd))
    return found


# ------------------------------------------------------------------------------------------------- a script's flags
class _Parser(BaseException):
    """Raised from parse_known_args: carries the parser the script built (BaseException: no handler swallows it)."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


@contextlib.contextmanager
def _capture(argv0: str):
    def hook(self, args=None, namespace=None):
        raise _Parser(self)

    saved, saved_argv, saved_path = argparse.ArgumentParser.parse_known_args, sys.argv, list(sys.path)
    argparse.ArgumentParser.parse_known_args = hook
    sys.argv = [argv0]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        argparse.ArgumentParser.parse_known_args = saved
        sys.argv = saved_argv
        sys.path[:] = saved_path  # the entry scripts put the checkout on sys.path


_FLAGS: dict[str, set] = {}


def script_flags(target: str) -> set:
    """The option strings the script's parser accepts (what its --help lists)."""
    if target in _FLAGS:
        return _FLAGS[target]
    parser = None
    try:
        if target.startswith("-m "):
            with _capture(target[3:]):
                runpy.run_module(target[3:], run_name="__main__", alter_sys=False)
        else:
            with _capture(str(ROOT / target)):
                runpy.run_path(str(ROOT / target), run_name="__main__")
    except _Parser as p:
        parser = p.parser
    assert parser is not None, f"{target} ran to its end without building an argument parser"
    flags = {s for a in parser._actions for s in a.option_strings} | EXTRA_FLAGS.get(target, set())
    _FLAGS[target] = flags
    return flags


COMMANDS = documented_commands()


def test_commands_are_found():
    targets = {c[2] for c in COMMANDS}
    # the quick start, the BackdoorBench-style block and the study commands must be among them
    for t in ("analysis/run_study.py", "attack/badnet.py", "defense/pam.py", "retune_attack/ra.py",
              "retune_attack/qra.py", "analysis/lmc.py", "analysis/report.py", "analysis/ra_budget.py",
              "-m bdsafety.records"):
        assert t in targets, f"no documented command runs {t}"
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize("target", sorted({c[2] for c in COMMANDS}))
def test_documented_commands_match_their_scripts(target, monkeypatch):
    monkeypatch.chdir(ROOT)
    if not target.startswith("-m "):
        assert (ROOT / target).is_file(), f"documented script {target} does not exist"
    flags = script_flags(target)
    bad = []
    for page, line, t, used, yaml in COMMANDS:
        if t != target:
            continue
        unknown = [f for f in used if f not in flags]
        if unknown:
            bad.append(f"{page}: `{line}`: {', '.join(unknown)} not among {target}'s flags")
        if yaml and not re.search(r"[<{$]", yaml) and not (ROOT / yaml).is_file():
            bad.append(f"{page}: `{line}`: --yaml_path {yaml} does not exist")
    assert not bad, "\n".join(bad)


def test_command_checker_catches_a_wrong_flag():
    cmds = []
    for words in _segments("pip install -e . && python defense/pam.py --result_file x --rho_swep 0.5  # typo"):
        c = _python_commands(words)
        if c:
            cmds.append(c)
    assert cmds == [("defense/pam.py", ["--result_file", "--rho_swep"], None)]
    flags = script_flags("defense/pam.py")
    assert "--rho_sweep" in flags and "--yaml_path" in flags and "--rho_swep" not in flags


# --------------------------------------------------------------------------------------------------- README, links
def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"


def _slugs(page: Path) -> set:
    """Anchors of a page's headings, as python-markdown's toc (mkdocs) and GitHub make them."""
    out = set()
    _, prose = _split_fences(page.read_text())
    for line in prose.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"[`*_]|<[^>]+>", "", m.group(1))
        mk = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        mk = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", mk).strip().lower())
        gh = re.sub(r" ", "-", re.sub(r"[^\w\- ]", "", text.strip().lower()))
        out |= {mk, gh}
    return out


def _links(page: Path):
    _, prose = _split_fences(page.read_text())
    prose = re.sub(r"`[^`]*`", "", prose)  # code spans are not links
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


def test_relative_links_resolve():
    bad, n = [], 0
    for page in PAGES:
        for link in _links(page):
            if re.match(r"^[a-z]+:", link):
                continue
            n += 1
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                bad.append(f"{page.relative_to(ROOT)}: {link}: {path} does not exist")
                continue
            if anchor and target.suffix == ".md" and anchor not in _slugs(target):
                bad.append(f"{page.relative_to(ROOT)}: {link}: no heading #{anchor} in {target.relative_to(ROOT)}")
    assert n > 20
    assert not bad, "\n".join(bad)


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert re.search(rf":\s*{re.escape(page.name)}\s*$", nav, re.M), f"docs/{page.name} is not in mkdocs.yml's nav"


def test_mkdocs_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ((tmp_path / "site" / "index.html").is_file()
            and (tmp_path / "site" / "figures" / "ra_budget_demo_seed0.png").is_file())
