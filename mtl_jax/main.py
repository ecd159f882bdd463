"""Command line: ``mtl-jax train --config=configs/x.py[:arg] --workdir=DIR [--config.key=value ...]``
``mtl-jax merge --config=configs/merge/x.py[:arg] [--config.key=value ...]`` and ``mtl-jax plot WORKDIR``
(per-task learning curves as a PNG, ``mtl_jax.plot``).

``python -m mtl_jax.main --config=... --workdir=...`` is the same as ``mtl-jax train ...``.

Any failure ends the command with one line on stderr, ``mtl-jax: error: <message>``, and exit code
2 for a usage error (a bad config key or value, a missing file, a workdir in use: ``UsageError``),
1 for a runtime one (disk full, a non-finite streak, anything else) and 130 for Ctrl-C; ``--verbose``
prints the traceback too.
"""

from __future__ import annotations

import argparse
import sys
import traceback

COMMANDS = ("train", "merge", "plot")
VERBOSE = "--verbose"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits ``--config.a.b=v`` overrides from the other flags."""
    parser = argparse.ArgumentParser(prog="mtl-jax", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="train", help=f"one of {COMMANDS}")
    parser.add_argument("--config", required=True, help="configs/<file>.py[:arg], e.g. configs/multimnist.py:smoke")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics and results go here")
    parser.add_argument(VERBOSE, action="store_true", help="on an error, print its full traceback too "
                        "(train and merge; read by run())")
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    args = parser.parse_args(rest)
    if args.command not in COMMANDS:
        parser.error(f"unknown command '{args.command}'; valid commands: {list(COMMANDS)}")
    return args, overrides


def main(argv: list[str] | None = None) -> dict | None:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != VERBOSE]  # run() reads it
    if argv and argv[0] == "merge":
        from mtl_jax.merging.cli import main as merge_main

        return merge_main(argv[1:])
    if argv and argv[0] == "plot":
        from mtl_jax.plot import main as plot_main

        return plot_main(argv[1:])
    args, overrides = parse(argv)
    from mtl_jax.host_memory import reuse_freed_memory

    reuse_freed_memory()  # before JAX's CPU client starts its threads
    from absl import logging

    from mtl_jax.config import load_config

    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    config = load_config(args.config, overrides)
    from mtl_jax.train.trainer import maybe_initialize_distributed, train_and_evaluate

    maybe_initialize_distributed(config)  # before anything touches a device
    return train_and_evaluate(config, args.workdir)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point: ``main`` with every failure as one line on stderr,
    ``mtl-jax: error: <message>`` (see :func:`describe_error`), and its exit code; ``--verbose``
    (anywhere in ``argv``) prints the traceback first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE in argv
    try:
        main([a for a in argv if a != VERBOSE])
        return
    except KeyboardInterrupt as e:
        error, (code, message) = e, (130, "interrupted")
    except Exception as e:  # noqa: BLE001 -- every failure becomes one line
        error, (code, message) = e, describe_error(e, verbose)
    if verbose:
        traceback.print_exception(error)
    sys.stdout.flush()
    sys.stderr.write(f"mtl-jax: error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def describe_error(e: BaseException, verbose: bool = False) -> tuple[int, str]:
    """``(exit code, one-line message)`` for a failure of ``main``.

    2: ``UsageError`` (a bad config key or value, a workdir in use, ...), ``KeyError`` (an unknown
    config key), ``FileNotFoundError`` (a config file or other path named that does not exist).
    1: any other ``OSError`` ("No space left on device: '/path'"), ``FloatingPointError`` (the
    trainer's non-finite stop), and anything else as "<Type>: <message> (run with --verbose for the
    traceback)". A multi-line message is cut to its first line.
    """
    from mtl_jax.errors import UsageError

    if isinstance(e, OSError) and e.strerror:
        message = e.strerror + "".join(f"{sep}{name!r}" for sep, name in ((": ", e.filename), (" -> ", e.filename2))
                                        if name is not None)
    else:
        message = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
        message = next((line.strip() for line in message.splitlines() if line.strip()), "")
    if isinstance(e, (UsageError, KeyError, FileNotFoundError)):
        return 2, message or type(e).__name__
    if isinstance(e, (OSError, FloatingPointError)):
        return 1, message or type(e).__name__
    hint = "" if verbose else " (run with --verbose for the traceback)"
    return 1, f"{type(e).__name__}: {message}{hint}" if message else f"{type(e).__name__}{hint}"


if __name__ == "__main__":
    run()
