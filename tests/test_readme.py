"""The README's snippets run as written: every ```python block is executed (in a scratch folder, offline, on the
embedded default), and every `glimpseprune ...` line of its ```bash blocks parses with the real CLI (subcommand and
flags exist; values of the right type)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)]


PYTHON = _blocks("python")


def test_readme_has_python_snippets():
    assert PYTHON, "the README shows the Python API"


@pytest.mark.parametrize("line,code", PYTHON, ids=[f"README.md:{n}" for n, _ in PYTHON])
def test_python_snippet_runs(line, code, tmp_path):
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert r.returncode == 0, f"README.md:{line} failed:\n{r.stderr[-3000:]}"


def _cli_lines() -> list[tuple[int, list[str]]]:
    out = []
    for start, code in _blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", code)
        for k, line in enumerate(joined.splitlines()):
            if line.lstrip().startswith("#"):
                continue  # a comment line
            for part in re.split(r"&&|;", line.split("  #")[0]):
                words = shlex.split(part.strip(), comments=True) if part.strip() else []
                if words and words[0] == "glimpseprune":
                    out.append((start + k, words[1:]))
    return out


CLI = _cli_lines()


def test_readme_shows_cli_commands():
    assert len(CLI) >= 10


@pytest.mark.parametrize("line,argv", CLI, ids=[f"README.md:{n}" for n, _ in CLI])
def test_cli_line_parses(line, argv):
    from glimpseprune.cli import build_parser

    argv = [a for a in argv if a != "..."]
    if any(a.startswith("$") for a in argv):
        pytest.fail(f"README.md:{line}: unexpanded variable in {argv}")
    try:
        build_parser().parse_args(argv)
    except SystemExit as err:
        if err.code != 0:
            raise AssertionError(f"README.md:{line}: `glimpseprune {' '.join(argv)}` does not parse") from None
