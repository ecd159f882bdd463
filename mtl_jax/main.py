"""Command line: ``mtl-jax train --config=configs/x.py[:arg] --workdir=DIR [--config.key=value ...]``,
``mtl-jax merge --config=configs/merge/x.py[:arg] [--config.key=value ...]`` and ``mtl-jax plot WORKDIR``
(per-task learning curves as a PNG, ``mtl_jax.plot``).

``python -m mtl_jax.main --config=... --workdir=...`` is the same as ``mtl-jax train ...``. Flags are
absl flags; ``--config`` is ml_collections' ``config_flags.DEFINE_config_file``
(``mtl_jax.config.parse_command_line``); ``--help`` lists them.

Any failure ends the command with one line on stderr, ``mtl-jax: error: <message>``, and exit code
2 for a usage error (a bad config key or value, a missing file, a workdir in use: ``UsageError``),
1 for a runtime one (disk full, a non-finite streak, anything else) and 130 for Ctrl-C; ``--verbose``
prints the traceback too.
"""

from __future__ import annotations

import sys
import traceback

COMMANDS = ("train", "merge", "plot")
VERBOSE = "--verbose"
HELP = ("--help", "-h", "--helpfull")


def define_train_flags(flag_values) -> None:
    """The flags of ``mtl-jax train`` besides ``--config`` (``mtl_jax.config.parse_command_line``)."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "checkpoints, metrics and results go here", flag_values=flag_values,
                        required=True)
    flags.DEFINE_bool("verbose", False, "on an error, print its full traceback too (train and merge; read by run())",
                      flag_values=flag_values)


def parse(argv: list[str]) -> tuple:
    """``[train] --config=FILE[:arg] --workdir=DIR [--config.key=value ...]`` -> ``(the config file's
    ConfigDict, workdir, overrides)``, through absl flags and ml_collections' config_flags
    (``mtl_jax.config.parse_command_line``); the overrides are not applied yet. UsageError for an
    unknown command or flag."""
    from mtl_jax.config import parse_command_line
    from mtl_jax.errors import UsageError

    flag_values, positional, overrides = parse_command_line(argv, define_train_flags)
    if positional in ([], ["train"]):
        return flag_values.config, flag_values.workdir, overrides
    if len(positional) == 1 and positional[0] not in COMMANDS:
        raise UsageError(f"unknown command '{positional[0]}'; valid commands: {list(COMMANDS)}")
    raise UsageError(f"unexpected arguments {positional}: the command (one of {list(COMMANDS)}) comes first, "
                     f"then the flags")


def usage() -> str:
    """The help text of ``mtl-jax train``: this module's docstring and the flags."""
    from mtl_jax.config import command_line_flags

    return f"{__doc__}\n{command_line_flags(['mtl-jax'], define_train_flags).get_help()}"


def main(argv: list[str] | None = None) -> dict | None:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != VERBOSE]  # run() reads it
    if argv and argv[0] == "merge":
        from mtl_jax.merging.cli import main as merge_main

        return merge_main(argv[1:])
    if argv and argv[0] == "plot":
        from mtl_jax.plot import main as plot_main

        return plot_main(argv[1:])
    if any(a in HELP for a in argv):
        print(usage())
        return None
    from mtl_jax.host_memory import reuse_freed_memory

    reuse_freed_memory()  # before JAX's CPU client starts its threads
    from absl import logging

    from mtl_jax.config import prepare_config

    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    config, workdir, overrides = parse(argv)
    config = prepare_config(config, overrides)
    from mtl_jax.train.trainer import maybe_initialize_distributed, train_and_evaluate

    maybe_initialize_distributed(config)  # before anything touches a device
    return train_and_evaluate(config, workdir)


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
