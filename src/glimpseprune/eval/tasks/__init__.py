"""Benchmark tasks: local loaders for the paper's evaluation sets, each in its public release layout.

A task has a ``name``, a ``metric`` (the name of a scoring function in ``glimpseprune.eval.metrics``), ``load(data_dir,
limit)`` returning ``Sample``\\ s, and ``prompt(sample)`` building the full text prompt (as upstream / lmms-eval do).
Nothing is downloaded: a missing or malformed release raises ``FileNotFoundError`` / ``ValueError`` saying what to
download and where to put it. Each module's docstring gives its exact layout.

    >>> from glimpseprune.eval.tasks import get_task
    >>> samples = get_task("gqa").load("/data/gqa", limit=100)
"""

from __future__ import annotations

from ._base import CHOICE_LETTER, METRICS, SHORT_ANSWER, SINGLE_WORD, Sample, Task
from .chartqa import ChartQATask
from .docvqa import DocVQATask
from .gqa import GQATask
from .infovqa import InfoVQATask
from .mmbench import MMBenchTask
from .mme import MMETask
from .pope import POPETask
from .scienceqa import ScienceQAImgTask
from .textvqa import TextVQATask
from .visual_cot import VisualCoTTask
from .vizwiz import VizWizTask
from .vqav2 import VQAv2Task
from .vstar import VStarTask
from .world import WorldTask, WorldVideoTask

__all__ = [
    "CHOICE_LETTER", "METRICS", "SHORT_ANSWER", "SINGLE_WORD", "Sample", "Task", "ChartQATask", "DocVQATask",
    "GQATask", "InfoVQATask", "MMBenchTask", "MMETask", "POPETask", "ScienceQAImgTask", "TextVQATask", "VisualCoTTask",
    "VizWizTask", "VQAv2Task", "VStarTask", "WorldTask", "WorldVideoTask",
    "register_task", "get_task", "list_tasks",
]

_TASKS: dict[str, Task] = {}


def register_task(task, *, replace: bool = False):
    """Register a task under its ``name``: a ``Task`` instance, or a ``Task`` class taking no arguments (so this
    also works as a class decorator). Returns what it was given. A name already taken is a ``ValueError`` unless
    ``replace``; a task without a name or with an unknown metric is a ``ValueError`` too."""
    inst = task() if isinstance(task, type) else task
    if not isinstance(inst, Task):
        raise TypeError(f"register_task needs a Task instance or class, got {task!r}")
    if not inst.name:
        raise ValueError(f"{inst!r} has no name")
    if inst.metric not in METRICS:
        raise ValueError(f"task {inst.name}: metric {inst.metric!r} is not one of {list(METRICS)}")
    if inst.name in _TASKS and not replace:
        raise ValueError(f"a task named {inst.name!r} is already registered")
    _TASKS[inst.name] = inst
    return task


def get_task(name: str) -> Task:
    """The registered task ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_TASKS)


for _task in (
    VisualCoTTask(), VisualCoTTask(brief=True), VQAv2Task(), GQATask(), TextVQATask(), DocVQATask(), POPETask(),
    ChartQATask(), MMETask(), ScienceQAImgTask(), WorldTask(), WorldVideoTask(), VizWizTask(), InfoVQATask(),
    VStarTask(),
    MMBenchTask("en", "dev"), MMBenchTask("en", "test"), MMBenchTask("cn", "dev"), MMBenchTask("cn", "test"),
):
    register_task(_task)
del _task
