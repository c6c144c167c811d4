"""The command line: --help, ask end to end on a tiny model directory, clear errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

import glimpseprune as gp
from glimpseprune.cli import main
from glimpseprune.testing import random_image


def test_help():
    r = subprocess.run([sys.executable, "-m", "glimpseprune.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "ask" in r.stdout and "convert" in r.stdout
    with pytest.raises(SystemExit) as e:
        main(["ask", "--help"])
    assert e.value.code == 0


def test_ask(tiny_dir, module, tmp_path, capsys):
    gp.save_module(module, tmp_path / "mod")
    img = tmp_path / "img.png"
    random_image(224, 224, seed=5).save(img)
    assert main(["ask", "--model", str(tiny_dir), "--module", str(tmp_path / "mod"), "--image", str(img),
                 "--question", "What colour is it?", "--max-new-tokens", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    n, rest = last.removeprefix("kept ").split("/")
    assert last.startswith("kept ") and rest.startswith("64 (") and 1 <= int(n) <= 64
    assert main(["ask", "--model", str(tiny_dir), "--module", str(tmp_path / "mod"), "--image", str(img),
                 "--question", "Q?", "--fixed-keep-ratio", "0.25", "--json", "--max-new-tokens", "2"]) == 0
    assert '"kept": 16' in capsys.readouterr().out


def test_ask_errors(tiny_dir, tmp_path, capsys):
    assert main(["ask", "--model", str(tmp_path / "none"), "--question", "Q?"]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["ask", "--model", str(tiny_dir), "--image", str(tmp_path / "x.jpg"), "--question", "Q?"]) == 2
    assert "cannot read image file" in capsys.readouterr().err
    assert main(["ask", "--model", str(tiny_dir), "--question", "Q?", "--threshold", "2"]) == 2
    assert "threshold must be in [0, 1]" in capsys.readouterr().err
