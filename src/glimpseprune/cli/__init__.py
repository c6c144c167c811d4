"""The ``glimpseprune`` command. Thin: parses arguments and calls the library.

    glimpseprune ask IMAGE "QUESTION" [--overlay out.png]      (the embedded world model + module)
    glimpseprune ask --model DIR --module DIR --image PATH --question TEXT
    glimpseprune eval --split records.jsonl --out DIR     (exact match + kept fractions)
    glimpseprune compare --split records.jsonl --out DIR  (methods x budgets: JSON per run, table, plot)
    glimpseprune make-world --out DIR --n 500 --seed 1    (a split of the synthetic world)
    glimpseprune train --config configs/stage1_world.yaml [--resume]
    glimpseprune convert --upstream DIR --out DIR
    glimpseprune new-module --model DIR --out DIR [--preset NAME]
    glimpseprune make-tiny --out DIR [--family llava|qwen3_vl]   (tiny random model + untrained module + image)
    glimpseprune methods [--json]
    glimpseprune vllm-folder --model DIR --out DIR --method early_glimpse --keep-ratio 0.111 --module DIR

stdout carries results only (answers, summaries, ``--json`` objects); progress, notes and errors go to stderr.
``-v`` / ``-q`` work before or after the subcommand.

This package: ``main`` and its error handling here; ``parser`` (every subcommand's options), ``common``
(argument types, output helpers), ``method_args`` (--method / --method-arg, selection flags, loading),
``evaluate`` (eval), ``compare`` (compare), ``commands`` (the rest); ``python -m glimpseprune.cli`` runs it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys

from .commands import (
    cmd_ask,
    cmd_convert,
    cmd_demo,
    cmd_make_tiny,
    cmd_make_world,
    cmd_methods,
    cmd_new_module,
    cmd_tasks,
    cmd_train,
)
from .common import DTYPES, _printable, check_device, positive_int
from .compare import COMPARE_OWNED, cmd_compare
from .evaluate import EVAL_OWNED, atomic_write_text_lines, cmd_eval
from .method_args import SELECTION_FLAGS
from .method_args import _parse_typed as _parse_typed
from .parser import build_parser

__all__ = ["COMPARE_OWNED", "DTYPES", "EVAL_OWNED", "SELECTION_FLAGS", "atomic_write_text_lines", "build_parser",
           "check_device", "cmd_ask", "cmd_compare", "cmd_convert", "cmd_demo", "cmd_eval", "cmd_make_tiny",
           "cmd_make_world", "cmd_methods", "cmd_new_module", "cmd_tasks", "cmd_train", "main", "positive_int"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    # bench runs are long: their progress is logged by default (stderr), other commands log on --verbose
    verbose = args.verbose or (args.cmd == "bench" and not args.quiet)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s" if verbose else "%(levelname)s %(message)s")
    try:
        with _library_output(verbose=args.verbose, quiet=args.quiet):
            return args.fn(args)
    except (ValueError, TypeError, OSError, KeyError) as err:  # what bad input raises: one line, no traceback
        if args.verbose:  # not bench's default progress logging: its bad input is one line too
            logging.exception("failed")
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {_printable(_in_flags(str(msg)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours, not bad input: still one line, the traceback on --verbose
        if args.verbose:
            raise
        print(f"error: internal error ({type(err).__name__}: {_printable(str(err))}); rerun with -v for the "
              "traceback and please report it", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _library_output(verbose: bool, quiet: bool):
    """transformers' and huggingface_hub's own output for one command: their progress bars ("Loading weights")
    only with -v; with -q their info and warnings too (which also hides the Trainer's progress bar); restored
    afterwards (``main`` may run inside a longer-lived process)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    if bars and not verbose:
        hf_logging.disable_progress_bar()  # also huggingface_hub's
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars and not verbose:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)


# Library messages written for Python callers, as a command-line user must read them
_PYTHON_TO_FLAGS = [
    (r"pass module=load_module\(DIR\)", "pass --module DIR"),
    (r"pass layers=$", "pass --method-arg layers=A,B,C"),
    (r"Load both with gp\.load\(model_dir, module=.*$",
     "Load both: pass the folder as --module (or as a config's module:), which loads its adapter too"),
]


def _in_flags(message: str) -> str:
    for pattern, text in _PYTHON_TO_FLAGS:
        message = re.sub(pattern, text, message)
    return message
