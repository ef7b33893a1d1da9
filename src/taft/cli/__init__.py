"""The `taft` command: train, evaluate, predict, inspect checkpoints, run the demo; shard, compose, forget and
inspect model stores.

Errors the user can cause print one line (`taft: error: ...`) and exit with status 2; nothing half-written is left
behind (checkpoints and metadata are written atomically). The package: `parser` (options shared by several
commands), `run` (train, eval, predict, info, demo, cache, backbones), `store` (shards train, compose, forget,
store, report), `types` (checked argument types), `log` (--log-file).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Callable

import taft
from taft.cli import run, store
from taft.cli.types import OneLineParser
from taft.errors import TaftError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="taft", description="Tangent Attention Fine-Tuning: linearized fine-tuning of a pretrained "
                                 "transformer's last k blocks, composable, removable and private.")
    parser.add_argument("--version", action="version", version=f"taft {taft.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parsers(sub)
    store.add_parsers(sub)
    return parser


OPTIONS = {"device": "--device", "autocast": "--autocast", "skip_corrupt": "--skip-corrupt", "data_dir": "--data-dir",
           "path": "--data", "dataset": "--dataset",
           "accept_changed_data": "--accept-changed-data", "features": "--features", "augment": "--augment",
           "cache_max": "--cache-max", "loader_workers": "--loader-workers"}  # library parameter → its option
QUOTES = "\"'"


def in_cli_terms(e: TaftError) -> str:
    """The error's message with its library parameters as options: `name=True` → `--flag`, `name="v"` or
    `name=v` → `--flag v`; parameters the message does not spell so are named after it, in parentheses."""
    message, unnamed = str(e), []
    for name in (a for a in e.arguments if a in OPTIONS):
        flag = OPTIONS[name]
        keyword = re.compile(rf"\b{name}=(True\b|\"[^\"]*\"|'[^']*'|[^\s,;)]+)")
        message, count = keyword.subn(lambda m: flag if m[1] == "True" else f"{flag} {m[1].strip(QUOTES)}", message)
        if not count:
            unnamed.append(flag)
    return f"{message} ({', '.join(unnamed)})" if unnamed else message


def describe_os_error(e: OSError) -> str:
    """One line for a filesystem fault: the path(s) and the system's reason."""
    paths = " → ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    reason = e.strerror or str(e)
    return f"{paths}: {reason}" if paths else reason


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` for the command line: `taft: warning: <message>`, one line, no source location."""
    return f"taft: warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "log_file", None) is None:
        return run_command(args)
    from taft.cli.log import log_to

    try:
        with log_to(args.log_file, sys.argv[1:] if argv is None else argv):
            return run_command(args)
    except TaftError as e:  # the log file cannot be opened
        print(f"taft: error: {e}", file=sys.stderr)
        return 2


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; errors become one line on stderr and an exit status (see the module doc). Under
    torchrun, SIGTERM is an error from the start of the command until its error line is printed."""
    from taft.train.distributed import sigterm_as_error

    with sigterm_as_error() as stopping:
        return reported(args, stopping)


def reported(args: argparse.Namespace, stopping: Callable[[], None]) -> int:
    """`args.func(args)`, with its errors as one line on stderr and an exit status; `stopping()` is called as an
    error is caught (under torchrun: from then on SIGTERM, sent to every rank once one fails, adds nothing)."""
    previous_format = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    from taft.train.distributed import refuse_under_torchrun

    try:
        if args.command != "train":
            refuse_under_torchrun(f"taft {args.command}", "only taft train trains data-parallel; shards train in "
                                                          "parallel on their own (--workers, --executor ray)")
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
    except TaftError as e:
        stopping()
        print(f"taft: error: {in_cli_terms(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stopping()
        print("taft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `taft ... | head`: the reader is gone; stop quietly, as SIGPIPE would
        stopping()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status a shell reports for a tool stopped by a closed pipe
    except OSError as e:  # a filesystem fault (read-only or full disk, ...): saved state is never half-written
        stopping()
        print(f"taft: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous_format
    return 0
