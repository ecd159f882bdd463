"""What every experiment script shares: its command line, the report footer, the host allocator
set-up and the result cache.

Scripts run from the repository root as modules, ``python -m experiments.<name>`` (the merging
benchmark: ``python -m experiments.merging.run``), and end with ``common.run_main(main)``. Tables
end with :func:`produced_by`, the command that reproduces them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import secrets
import shlex
import shutil
import sys
import time
from typing import IO, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from mtl_jax.config import apply_overrides, config_from_file, load_config
from mtl_jax.host_memory import reuse_freed_memory
from mtl_jax.merging.tree import flatten_with_paths, leaf_paths, replace_flat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
RESULTS = os.path.join(ROOT, "experiments", "results")
OVERRIDE_PREFIX = "--config."

# ------------------------------------------------------------------------------------ command line


def argv_or_sys(argv: Sequence[str] | None) -> list[str]:
    """``argv`` as a list, or the process's arguments (``sys.argv[1:]``) when it is None."""
    return sys.argv[1:] if argv is None else list(argv)


def config_overrides(parser: argparse.ArgumentParser, rest: Sequence[str]) -> list[str]:
    """The ``--config.a.b=value`` arguments that ``parser.parse_known_args`` left over, as
    ``['a.b=value', ...]``; any other left-over argument is a parser error naming it."""
    unknown = [a for a in rest if not a.startswith(OVERRIDE_PREFIX)]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}; overrides look like --config.a.b=value")
    return [a[len(OVERRIDE_PREFIX):] for a in rest]


def parse_config_file(argv: Sequence[str] | None, description: str, default: str) -> ConfigDict:
    """``--config FILE[:ARG]`` (default ``default``) + ``--config.a.b=value`` overrides of a
    stand-alone config file (``get_config(arg)``; every overridden key must exist in it)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default, help="FILE[:ARG], e.g. configs/merge/vit_benchmark.py:smoke")
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(parser, rest)
    config = config_from_file(args.config)
    apply_overrides(config, overrides, free_form=())
    return config


def mean_std(values, scale: float = 1.0, digits: int = 2, ddof: int = 0) -> str:
    """``'mean ± std'`` of ``scale * values`` with ``digits`` decimals (just the mean for one value)."""
    values = scale * np.asarray(values, float)
    mean = f"{values.mean():.{digits}f}"
    return f"{mean} ± {values.std(ddof=ddof):.{digits}f}" if len(values) > 1 else mean


def log(message: str) -> None:
    """``[HH:MM:SS] message`` on stderr, flushed (progress of a long run)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (on a shared machine wall time overstates cost)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------ report


def command_line(module: str, argv: Sequence[str]) -> str:
    """``python -m <module> <argv...>``, quoted for a POSIX shell: the command that reproduces a run
    (from the repository root)."""
    return shlex.join(["python", "-m", module, *argv])


def load_average_note() -> str:
    """The machine's 1-minute load average now, as a footer note (wall times depend on it)."""
    return f"1-minute load average at the end: {os.getloadavg()[0]:.1f}"


def footer(command: str, note: str = "") -> str:
    """The last line of a report: ``Produced by: `<command>` (<note>).``"""
    return f"Produced by: `{command}`" + (f" ({note})" if note else "") + "."


def produced_by(module: str, argv: Sequence[str], note: str = "") -> str:
    """:func:`footer` of ``python -m <module> <argv...>``."""
    return footer(command_line(module, argv), note)


# ------------------------------------------------------------------------------- host allocator


def run_main(main: Callable[[], object]) -> None:
    """A script's entry point: the host allocator settings of ``mtl-jax train``
    (:func:`mtl_jax.host_memory.reuse_freed_memory`, applied before JAX's first computation starts
    its CPU threads), then ``main()``."""
    reuse_freed_memory()
    main()


# ------------------------------------------------------------------------------------ result cache


def settings_hash(*parts) -> str:
    """10 hex digits identifying ``parts`` (JSON-serialised with sorted keys): a cache key."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def read_json(path: str, default=None):
    """The JSON document at ``path``, or ``default`` when there is no such file; ValueError naming
    the file when it is not valid JSON (it is left in place)."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); move it aside to recompute what it held") from None


def read_text(path: str) -> str | None:
    """The text of the file at ``path``, or None when there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def write_atomic(path: str, fill: Callable[[IO], None], binary: bool = False) -> None:
    """Write a file at ``path`` by ``fill(file)``: into a hidden temporary sibling
    (``.<name>.partial-<pid>-<random>``, same folder; folders created), fsynced, then renamed over
    ``path``. A crash or an exception in ``fill`` leaves the previous ``path`` (or none) and no
    temporary; concurrent writers never interleave (the last rename wins)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb" if binary else "x") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str, text: str) -> None:
    """``text`` at ``path``, written atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text))


def write_json(path: str, data, **dump_kwargs) -> None:
    """``data`` as JSON at ``path``, written atomically (:func:`write_atomic`: a crash or a value
    ``json.dump`` rejects never leaves a truncated file); ``dump_kwargs`` go to ``json.dump``."""
    write_atomic(path, lambda f: json.dump(data, f, **dump_kwargs))


def cached_json(path: str, build: Callable[[], object]):
    """``build()`` once, stored as JSON at ``path`` (non-JSON numbers as floats); later calls read it."""
    stored = read_json(path)
    if stored is not None:
        return stored
    value = build()
    write_json(path, value, default=float)
    return value


def save_tree(path: str, tree) -> None:
    """The leaves of ``tree`` as one ``.npz`` keyed by their '/'-joined paths (written atomically,
    :func:`write_atomic`)."""
    arrays = {p: np.asarray(x) for p, x in flatten_with_paths(tree)}
    write_atomic(path, lambda f: np.savez(f, **arrays), binary=True)


def load_tree(path: str, template):
    """A tree shaped like ``template`` with the leaves stored in ``path`` (ValueError naming the
    missing leaves on a mismatch)."""
    with np.load(path) as f:
        flat = {k: f[k] for k in f.files}
    missing = [p for p in leaf_paths(template) if p not in flat]
    if missing:
        raise ValueError(f"{path} lacks leaves {missing[:5]}")
    return replace_flat(template, {k: jnp.asarray(v) for k, v in flat.items()})


def cached_tree(path: str, template, build: Callable):
    """``build()`` once, stored at ``path`` (:func:`save_tree`); later calls load it into
    ``template``'s structure."""
    if os.path.exists(path):
        return load_tree(path, template)
    tree = build()
    save_tree(path, tree)
    return tree


def train_cached(config_arg: str, overrides: Sequence[str], workdir: str) -> dict:
    """Test results of one ``mtl_jax`` training run of ``config_arg`` + ``overrides``, read back
    from ``workdir/results.json`` when an earlier call finished the same config there (a long sweep
    resumes where it stopped); an interrupted run of the same config resumes from its checkpoint. A
    workdir that holds another config's run (``run_config.json`` differs or is missing) is emptied
    first, so its checkpoint is never resumed as this run."""
    from mtl_jax.train.trainer import train_and_evaluate  # here: the scripts that only report skip its imports

    config = load_config(config_arg, list(overrides) + ["progress_bar=False", "baselines=''"])
    key = config.to_json(sort_keys=True)
    path, started = os.path.join(workdir, "results.json"), os.path.join(workdir, "run_config.json")
    saved = read_json(path, {})
    if saved.get("config") == key:
        return saved["results"]
    if os.path.exists(workdir) and read_text(started) != key:
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    write_text(started, key)
    results = train_and_evaluate(config, workdir)["results"]
    write_json(path, {"config": key, "results": results})
    return results
