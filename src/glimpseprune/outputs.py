"""Output folders that never lose a user's work.

* ``ensure_writable_dir``: an output path that cannot be written (a parent is a file, no permission, a read-only or
  pseudo file system) fails before a run starts, with the path named; ``check_new_folder``: a folder a command fills
  from scratch is not written over without ``--overwrite``.
* ``atomic_write_text``: a result file is written to a temporary name beside it and renamed into place, so a crash
  never leaves half a file and a reader never sees one.
* ``claim_run_dir``: a folder belongs to one run. Each command that writes results records what it ran in
  ``RUN_MARKER`` (the command and its result-changing settings). A folder that already holds files this command owns
  is refused unless the user says ``overwrite`` (those files, and only those, are removed first) or ``resume``
  (continued only when the recorded settings equal the new ones). Files the command does not own are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

RUN_MARKER = "glimpseprune_run.json"


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` (and its parents) as a folder we can write in, or raise ``ValueError`` naming the problem."""
    p = Path(path)
    probe = p
    while not probe.exists():  # the nearest existing ancestor decides whether we can create the rest
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == p else f"has a file in its path ({probe})"
        raise ValueError(f"cannot write output to {p}: it {what}")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write output to {p}: no write permission in {probe}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output folder {p}: {err.strerror or err}") from err
    # permissions do not tell everything (root on /proc or /sys, a read-only mount): write and remove a probe file
    probe_file = p / f".glimpseprune-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe_file, "x"):
            pass
        probe_file.unlink()
    except OSError as err:
        raise ValueError(f"cannot write output to {p}: {err.strerror or err}") from err
    return p


def check_new_folder(path: str | Path, overwrite: bool = False, flag: str = "--out") -> Path:
    """A folder a command fills from scratch (a module, a model): refused when it is a file, or when it already
    holds files and ``overwrite`` is not given (they would be replaced silently); then made and checked writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p} is a file, not a folder")
    held = sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"{flag} {p} already holds files ({shown}); choose a new folder, or pass --overwrite to "
                         "write over them")
    return ensure_writable_dir(p)


def check_writable_file(path: str | Path) -> Path:
    """Fail now, not after a run, when ``path`` cannot be written: its folder cannot be made or it is a folder."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"cannot write {p}: it is a folder")
    ensure_writable_dir(p.parent if str(p.parent) else Path("."))
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"cannot write {p}: no write permission")
    return p


def read_json(path: str | Path, what: str = "") -> Any:
    """The JSON value in ``path``, read as UTF-8. A file that cannot be read or parsed is a ValueError that names it
    (prefixed by ``what``, e.g. "shape file"); a missing file stays FileNotFoundError."""
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{label}: not JSON ({err})") from err
    except OSError as err:  # a folder, no permission, ...
        raise ValueError(f"{label} cannot be read ({err})") from err


def atomic_replace(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Make ``path`` with ``write(tmp)`` on a temporary file in the same folder, then ``os.replace``: an interrupted
    write leaves the earlier file whole and no temporary file behind."""
    p = Path(path)
    tmp = p.parent / f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # created with the umask's mode
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""

    def write(tmp: Path) -> None:
        with open(tmp, "x", encoding="utf-8") as f:  # as read_json reads, whatever the locale's encoding
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_replace(path, write)


def atomic_write_text_lines(path: str | Path, rows: list[dict]) -> Path:
    """Rows as JSON lines (``samples.jsonl``), written atomically: a resumed run rewrites what it keeps this way."""
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def _owned(out: Path, owned: list[str], marker: str = RUN_MARKER) -> list[Path]:
    found = {q for pattern in owned for q in out.glob(pattern)}
    marker = out / marker
    if marker.exists():
        found.add(marker)
    return sorted(found)


def _remove(paths: list[Path]) -> None:
    for q in paths:
        if q.is_dir() and not q.is_symlink():
            shutil.rmtree(q)
        else:
            q.unlink(missing_ok=True)


def holds_run(out_dir: str | Path, result: str, command: str, settings: dict, marker: str = RUN_MARKER) -> bool:
    """True when ``out_dir`` holds ``result`` (a file, written last by the run) and its run record ``marker`` says
    ``command`` made it with these very ``settings`` (compared as JSON gives them back): a complete run that a
    deterministic command need not repeat. An unreadable record is False."""
    out_dir = Path(out_dir)
    if not (out_dir / result).is_file() or not (out_dir / marker).is_file():
        return False
    try:
        record = read_json(out_dir / marker)
    except (OSError, ValueError):  # unreadable, or gone since the check above
        return False
    return isinstance(record, dict) and record.get("command") == command and \
        record.get("settings") == json.loads(json.dumps(settings, default=str))


def claim_run_dir(out: str | Path, command: str, settings: dict, owned: list[str], *, resume: bool = False,
                  overwrite: bool = False, resume_flag: str = "--resume", marker: str = RUN_MARKER) -> dict | None:
    """Make ``out`` this run's folder; returns the earlier run's record when resuming (else None).

    ``owned``: glob patterns (relative to ``out``) of the files this command writes. ``settings``: JSON-able values
    that decide the results; a resumed run must match them exactly.
    """
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces it: pass one of them")
    p = ensure_writable_dir(out)
    mine = _owned(p, owned, marker)
    record = {"command": command, "settings": settings}
    earlier = None
    record_file = p / marker
    if resume:
        if not record_file.is_file():
            what = f"results of a run without a {marker} record" if mine else "no earlier run"
            raise ValueError(f"nothing to resume in {p}: it holds {what}")
        earlier = read_json(record_file, "the run record")
        if not isinstance(earlier, dict) or not isinstance(earlier.get("settings", {}), dict):
            raise ValueError(f"cannot read the run record {record_file}: not a run record (a JSON object with "
                             "'command' and 'settings'); pass --overwrite to start again")
        if earlier.get("command") != command:
            raise ValueError(f"{p} holds a run of `{earlier.get('command')}`, not of `{command}`; cannot resume it")
        before = earlier.get("settings", {})
        diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if diff:
            detail = "; ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"cannot resume the run in {p}: its settings differ ({detail})")
    elif mine:
        if not overwrite:
            names = ", ".join(q.name for q in mine[:4]) + (" ..." if len(mine) > 4 else "")
            hint = f"{resume_flag} to continue it, " if resume_flag else ""
            raise ValueError(f"{p} already holds results of an earlier run ({names}); pass {hint}--overwrite to "
                             "replace them, or choose another output folder")
        _remove(mine)
    atomic_write_json(record_file, record)
    return earlier
