"""What every command shares: the one-line errors and --debug, the entry point of the scripts in examples/,
a fresh `parscale-ear` process, and the sampling flags (steps, guidance, temperature, LazyMAR's caches).

The `parscale-ear` parser (:mod:`parscale_ear_hf.cli`) imports the commands; the commands import this
module, never the parser.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .models._checks import check_float, check_int
from .pipeline_parscale_ear import SamplingCache

# Errors whose message says what to fix; anything else (AttributeError, TypeError, a RuntimeError
# from torch, ...) is more likely a bug, and its one line says how to get the traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def cli_process(*argv: str, env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment that run ``parscale-ear <argv>`` in a fresh process on this very code.

    ``python -m`` alone puts the working directory first on ``sys.path``: a driver started from one checkout,
    in another checkout's folder, would train and score with the other's code while recording its own
    revision. ``-P`` keeps the working directory off the path and this package's root leads ``PYTHONPATH``.

    Args:
        argv: the subcommand and its flags.
        env: the environment to start from (default: this process's).
    """
    env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parents[1])
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *rest])
    return [sys.executable, "-P", "-m", "parscale_ear_hf.cli", *argv], env


def error_line(error: BaseException) -> str:
    """``error`` as one line: its message, plus its type and the --debug hint when it is not a user error."""
    message = " ".join(str(error).split())
    if isinstance(error, USER_ERRORS) and message:
        return message
    return f"{message or 'no message'} ({type(error).__name__}; rerun with --debug for the traceback)"


def add_debug_flag(parser: argparse.ArgumentParser, default=False) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="on an error, show the traceback, not one line"
    )


def run_command(prog: str, func: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    """``func(args)``; an error prints ``<prog>: error: <one line>`` to stderr and exits 1 (Ctrl-C: 130),
    or propagates with its traceback under --debug."""
    try:
        func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        sys.exit(130)
    except Exception as error:
        if args.debug:
            raise
        print(f"{prog}: error: {error_line(error)}", file=sys.stderr)
        sys.exit(1)


def run_script(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], object]) -> None:
    """Parse the command line and run ``func(args)`` as `parscale-ear` runs a subcommand: the entry
    point of every script in examples/ (which gets a --debug flag)."""
    add_debug_flag(parser)
    run_command(parser.prog, func, parser.parse_args())


def check_sampling_flags(owner: str, steps: int | None, guidance: float | None, temperature: float | None) -> None:
    """Refuse, before any model is loaded, the --steps / --guidance / --temperature that the pipeline
    would refuse (None: not given, the command's or the pipeline's default), inf and nan included."""
    if steps is not None:
        check_int(owner, "--steps", steps, 1)
    if guidance is not None:
        check_float(owner, "--guidance", guidance, 1.0, math.inf)
    if temperature is not None:
        check_float(owner, "--temperature", temperature, 0.0, math.inf)


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`~parscale_ear_hf.SamplingCache` (LazyMAR's caches); see :func:`cache_from_args`."""
    cache = parser.add_argument_group(
        "sampling caches (LazyMAR's; not exact): without --token-cache or --condition-cache sampling is exact; "
        "unset values are SamplingCache's defaults"
    )
    cache.add_argument("--token-cache", action="store_true", help="recompute only the positions that changed")
    cache.add_argument(
        "--token-share", type=float, default=None, help="with --token-cache: share of other positions recomputed"
    )
    cache.add_argument("--condition-cache", action="store_true", help="reuse the guidance residual between refreshes")
    cache.add_argument(
        "--cache-refresh-every",
        type=int,
        default=None,
        help="a full pass every this many steps (default: by the step count, min(8, max(1, steps // 2)))",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the backbone step (pipe.enable_compiled_step())"
    )


def cache_from_args(owner: str, args: argparse.Namespace):
    """The :class:`~parscale_ear_hf.SamplingCache` of the flags of :func:`add_cache_arguments`, or None
    (exact sampling); refuses flags that would do nothing."""
    if args.token_share is not None and not args.token_cache:
        raise ValueError(f"{owner}: --token-share is the token cache's; add --token-cache, or leave it out.")
    if not (args.token_cache or args.condition_cache):
        if args.cache_refresh_every is not None:
            raise ValueError(
                f"{owner}: --cache-refresh-every paces the sampling caches; add --token-cache and/or "
                "--condition-cache, or leave it out (exact sampling)."
            )
        return None
    fields = {"token_cache": args.token_cache, "condition_cache": args.condition_cache}
    if args.token_share is not None:
        check_float(owner, "--token-share", args.token_share, 0.0, 1.0)
        fields["token_share"] = args.token_share
    if args.cache_refresh_every is not None:
        check_int(owner, "--cache-refresh-every", args.cache_refresh_every, 1)
        fields["refresh_every"] = args.cache_refresh_every
    return SamplingCache(**fields)
