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


SCRIPTS = sorted(p for d in ("benchmarks", "scripts") for p in (README.parent / d).rglob("*")
                 if p.suffix in (".py", ".sh") and "__pycache__" not in p.parts)


def test_scripts_are_found():
    assert any(p.suffix == ".py" for p in SCRIPTS) and any(p.suffix == ".sh" for p in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=[str(p.relative_to(README.parent)) for p in SCRIPTS])
def test_benchmark_and_setup_scripts_parse(path):
    """The scripts the README tells users to run are not imported by any test: a syntax error in one (vllm_load.py
    had one after a move of an import) went unnoticed. Python files compile, shell files pass ``bash -n``."""
    if path.suffix == ".py":
        compile(path.read_text(), str(path), "exec")
    else:
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", [p for p in SCRIPTS if p.suffix == ".py"],
                         ids=[str(p.relative_to(README.parent)) for p in SCRIPTS if p.suffix == ".py"])
def test_benchmark_scripts_import_names_that_exist(path):
    """Every ``from glimpseprune... import name`` in a script (module level or inside a function) names something the
    package has: a refactor that moves a name breaks the scripts no test runs."""
    import ast
    import importlib

    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("glimpseprune"):
            mod = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(mod, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name} (line {node.lineno})")
    assert not missing, f"{path.name} imports names that do not exist: {missing}"
