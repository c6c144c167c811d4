"""Run metadata for benchmark results: device, library versions, git commit, time. Imported by the runners and the
report writers alike (so neither imports the other for it)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def _git_commit() -> str | None:
    """HEAD (+dirty) of the checkout the package runs from; where there is no git repository (a copy of the tree on
    a lent machine) the ``GLIMPSEPRUNE_COMMIT`` environment variable, if set, names it."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return os.environ.get("GLIMPSEPRUNE_COMMIT") or None
    try:
        # --no-optional-locks: `status` must not refresh (and lock) the index of a checkout someone is working in
        git = ["git", "--no-optional-locks", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'+dirty' if dirty else ''}" if head else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Device, library versions, git commit and time of a run."""
    import transformers

    from .. import __version__

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "glimpseprune": __version__, "git_commit": _git_commit(),
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
