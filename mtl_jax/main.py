"""Command line: ``mtl-jax train --config=configs/x.py[:arg] --workdir=DIR [--config.key=value ...]``
and ``mtl-jax merge --config=configs/merge/x.py[:arg] [--config.key=value ...]``.

``python -m mtl_jax.main --config=... --workdir=...`` is the same as ``mtl-jax train ...``.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = ("train", "merge")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits ``--config.a.b=v`` overrides from the other flags."""
    parser = argparse.ArgumentParser(prog="mtl-jax", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="train", help=f"one of {COMMANDS}")
    parser.add_argument("--config", required=True, help="configs/<file>.py[:arg], e.g. configs/multimnist.py:smoke")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics and results go here")
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
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "merge":
        from mtl_jax.merging.cli import main as merge_main

        return merge_main(argv[1:])
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


def run() -> None:
    """Console-script entry point: exits with a one-line error for bad configs."""
    try:
        main()
    except (KeyError, ValueError, FileNotFoundError) as e:
        sys.exit(f"mtl-jax: error: {e.args[0] if e.args else e}")


if __name__ == "__main__":
    run()
