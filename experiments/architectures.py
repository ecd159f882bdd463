"""Every multi-task architecture with equal weighting, over seeds: accuracy, Δm%, parameters, FLOPs, speed.

    python -m experiments.architectures                          # every architecture config, 3 seeds
    python -m experiments.architectures --archs=hps,mmoe --seeds=0 --config.num_steps=50
    python -m experiments.architectures --smoke --workdir=/tmp/a --out=/tmp/a/table   # seconds per run

The architectures come from the config files present when it runs (``discover_entries``):
``configs/multimnist.py`` is ``hps`` (LeNet hard parameter sharing), every ``configs/multimnist_<x>.py``
is ``<x>`` (``vit``: HPS on a ViT trunk), and configs of other task families (``multitab_bench.py``,
``pde_*.py``) are entries of their own family. Every MultiMNIST architecture is compared with the
single-task LeNet of configs/multimnist.py (one per digit, the usual Δm% reference, e.g. LibMTL's);
another family's reference is its own config trained once per task (``config.data.tasks = (task,)``,
as ``experiments.single_task_baselines`` does). Baselines are trained at the same budget and seeds
as the multi-task runs. ``--config.key=value`` applies to every run; MultiMNIST runs additionally
get ``MULTIMNIST_BUDGET`` (sized for the 2-core CPU machine), other families ``FAMILY_BUDGET``, unless
``--full`` or ``--smoke``; a config's lr warm-up longer than 10% of the shortened run is cut to 10%.

Writes one markdown table per task family (main metric per task, average, Δm% vs single-task:
mean ± std over seeds; parameters; inference FLOPs per example for all tasks, from XLA's cost
analysis; train steps/s) and a JSON of every run to ``--out`` .md / .json. An architecture whose run
fails is reported as failed (the error in the table) and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import statistics
import time
import traceback

import numpy as np

from experiments import common
from experiments.common import CONFIGS, mean_std
from mtl_jax.config import load_config
from mtl_jax.data import get_dataset
from mtl_jax.models import build_model
from mtl_jax.models.flops import model_cost
from mtl_jax.train.reporting import delta_m

MULTIMNIST_HPS = "multimnist.py"
OTHER_FAMILIES = ("multitab_bench.py", "pde_*.py")  # file patterns under configs/; each file is its own family
# MultiMNIST budget for the CPU run (2 cores shared with other jobs; MMoE / DSelect-k steps cost ~20x an
# HPS step there): 10k / 2k pairs (from the same 4,000 / 1,000 source digits), batch 64, 150 steps (~1 epoch).
# An early-training comparison: compare architectures with each other at this budget, not with papers.
MULTIMNIST_BUDGET = ("data.num_train=10000", "data.num_test=2000", "batch_size=64", "num_steps=150",
                     "log_every=25", "checkpoint.enabled=False")
# Other task families (MultiTab-Bench, PDEs): their own data and model sizes, the step count capped.
FAMILY_BUDGET = ("num_steps=300", "log_every=25", "checkpoint.enabled=False")
SMOKE_BUDGET = ("checkpoint.enabled=False",)
NOT_RUN = "not run (--report-only: no earlier run with these settings)"
MAX_WARMUP_FRACTION = 0.1  # a config's lr warm-up is cut to this fraction of a shortened run


@dataclasses.dataclass(frozen=True)
class Entry:
    """One architecture: ``config`` ('path.py[:arg]') and the config whose single-task runs are its
    Δm% reference (``baseline``); entries sharing a baseline form one family (one table)."""

    name: str
    config: str
    baseline: str
    family: str


def discover_entries(configs_dir: str = CONFIGS) -> dict:
    """{name: Entry} for the architecture configs in ``configs_dir`` (see the module docstring)."""
    hps = os.path.join(configs_dir, MULTIMNIST_HPS)
    entries = {}
    if os.path.exists(hps):
        entries["hps"] = Entry("hps", hps, hps, "multimnist")
        for path in sorted(glob.glob(os.path.join(configs_dir, "multimnist_*.py"))):
            name = os.path.basename(path)[len("multimnist_"):-len(".py")]
            entries[name] = Entry(name, path, hps, "multimnist")
    for pattern in OTHER_FAMILIES:
        for path in sorted(glob.glob(os.path.join(configs_dir, pattern))):
            name = os.path.basename(path)[:-len(".py")]
            entries[name] = Entry(name, path, path, name)
    return entries


def select(entries: dict, archs: str) -> list:
    """The entries named in the comma list ``archs`` ('' = all, in discovery order), in that order (it is
    the order they train in); unknown names fail listing the valid ones."""
    names = [a for a in archs.split(",") if a] or list(entries)
    unknown = [a for a in names if a not in entries]
    if unknown:
        raise SystemExit(f"unknown architecture(s) {unknown}; valid: {list(entries)}")
    return [entries[a] for a in dict.fromkeys(names)]


def with_arg(spec: str, arg: str) -> str:
    """'x.py' + 'smoke' -> 'x.py:smoke'; 'x.py:a=1' + 'smoke' -> 'x.py:a=1,smoke'."""
    if not arg:
        return spec
    return f"{spec},{arg}" if ":" in spec else f"{spec}:{arg}"


def steps_per_sec(workdir: str) -> float | None:
    """Median train steps/s of the logged windows in ``workdir/metrics.jsonl``, without the first
    window (it holds the compilation) when there are others."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rates = [r["steps_per_sec"] for r in map(json.loads, f) if r.get("split") == "train" and "steps_per_sec" in r]
    return statistics.median(rates[1:] or rates) if rates else None


def warmup_cap(spec: str, overrides: list) -> list:
    """``['optim.warmup_steps=N']`` when the config's warm-up exceeds ``MAX_WARMUP_FRACTION`` of its
    (explicit) ``num_steps`` (a ViT's 200 warm-up steps would fill a 150-step budget), else []."""
    config = load_config(spec, overrides)
    if config.num_steps is None:
        return []
    cap = int(MAX_WARMUP_FRACTION * config.num_steps)
    return [f"optim.warmup_steps={cap}"] if config.optim.warmup_steps > cap else []


def train_once(spec: str, overrides: list, workdir: str) -> dict:
    """One fresh training run (``workdir`` emptied first): {'results', 'steps_per_sec', 'seconds'}."""
    shutil.rmtree(workdir, ignore_errors=True)
    overrides = list(overrides) + warmup_cap(spec, overrides)
    start = time.perf_counter()
    results = common.train_cached(spec, overrides, workdir)
    return {"results": results, "steps_per_sec": steps_per_sec(workdir), "seconds": time.perf_counter() - start}


def architecture_cost(spec: str, overrides: list) -> dict:
    """{'params', 'flops_per_example', 'model', 'tasks': the dataset's TaskSpecs} of a config."""
    config = load_config(spec, overrides)
    dataset = get_dataset(config.data)
    example = np.asarray(dataset.splits["train"][0][dataset.input_key])
    cost = model_cost(build_model(config.model, dataset.tasks), example)
    model = config.model.name if config.model.name != "hps" else f"hps ({config.model.trunk})"
    return {**cost, "model": model, "tasks": tuple(dataset.tasks)}


def single_task_baselines(spec: str, tasks: list, overrides: list, seeds: list, workdir: str) -> dict:
    """{task: [run per seed]}: ``spec`` trained on each task alone."""
    return {task: [train_once(spec, overrides + [f"data.tasks=('{task}',)", f"seed={seed}"],
                              os.path.join(workdir, f"single_{task}_s{seed}")) for seed in seeds]
            for task in (t.name for t in tasks)}


def baseline_means(single: dict) -> dict:
    """{task: {metric: mean over seeds}} of the single-task runs (what delta_m compares with)."""
    out = {}
    for task, runs in single.items():
        metrics = runs[0]["results"][task]
        out[task] = {m: float(np.mean([r["results"][task][m] for r in runs])) for m in metrics}
    return out


def resolved_config(spec: str, overrides: list) -> str:
    """The config a run of ``spec`` with ``overrides`` trains (sorted JSON): what --reuse compares, so an
    edited config file retrains its architecture."""
    return load_config(spec, overrides).to_json_best_effort(sort_keys=True)


def run_entry(entry: Entry, overrides: list, seeds: list, baselines: dict, workdir: str) -> dict:
    """Cost and one run per seed of an architecture, with Δm% per seed vs ``baselines``."""
    record = {"config": entry.config, "resolved": resolved_config(entry.config, overrides),
              **architecture_cost(entry.config, overrides), "runs": []}
    for seed in seeds:
        out = train_once(entry.config, overrides + [f"seed={seed}"], os.path.join(workdir, f"{entry.name}_s{seed}"))
        out["delta_m"] = delta_m(out["results"], baselines, record["tasks"])
        record["runs"].append(out)
    return record


def run_or_error(entry: Entry, overrides: list, seeds: list, baselines: dict, workdir: str) -> dict:
    """``run_entry``, or ``{'error': ...}`` when it raises (the traceback printed): one architecture's
    failure is reported in the table and the others still run."""
    try:
        return run_entry(entry, overrides, seeds, baselines, workdir)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"error": error_text(e)}


def fmt_metric(values, metric: str) -> str:
    """Accuracy in percent, other metrics as they are; mean ± std over seeds."""
    values = np.asarray(values, float)
    if metric == "accuracy":
        return mean_std(100 * values)
    return f"{values.mean():.4g} ± {values.std():.2g}" if len(values) > 1 else f"{values.mean():.4g}"


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def table_rows(records: dict, tasks: list) -> list:
    """Markdown rows of one family: architecture, model, per-task main metric, average, Δm%,
    parameters, FLOPs/example, train steps/s."""
    rows = []
    for name, rec in records.items():
        if "error" in rec:
            rows.append(f"| {name} | {rec['error']} |" + " |" * (len(tasks) + 5))
            continue
        per_task = [[r["results"][t.name][t.metrics[0]] for r in rec["runs"]] for t in tasks]
        average = np.mean(np.asarray(per_task, float), axis=0)
        rates = [r["steps_per_sec"] for r in rec["runs"] if r["steps_per_sec"]]
        main = {t.metrics[0] for t in tasks}
        cells = ([name, rec["model"]] + [fmt_metric(v, t.metrics[0]) for v, t in zip(per_task, tasks)]
                 + [fmt_metric(average, main.pop()) if len(main) == 1 else "-",
                    mean_std([r["delta_m"] for r in rec["runs"]]), fmt_count(rec["params"]),
                    fmt_count(rec["flops_per_example"]), f"{np.median(rates):.2f}" if rates else "-"])
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def family_table(family: str, records: dict, tasks: list, baselines: dict, caption: str) -> list:
    """The markdown lines of one family's table."""
    metric_cols = [f"{t.name} {t.metrics[0]}{' (%)' if t.metrics[0] == 'accuracy' else ''} "
                   f"{'↑' if t.higher_is_better[0] else '↓'}" for t in tasks]
    head = (["architecture", "model"] + metric_cols
            + ["average", "Δm% ↓", "params", "FLOPs / example", "train steps/s"])
    base = ", ".join(f"{t.name} {fmt_metric([baselines[t.name][t.metrics[0]]], t.metrics[0])}" for t in tasks)
    return [f"### {family}: architectures with equal weighting", "", caption, "",
            f"Single-task baselines (same budget, mean over seeds): {base}.", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + table_rows(records, tasks)


def caption_for(family: str, overrides: list, seeds: list, baseline_spec: str) -> str:
    reference = os.path.relpath(baseline_spec, os.path.join(CONFIGS, ".."))
    return (f"Seeds {','.join(map(str, seeds))}; mean ± std over seeds (population std). Budget (config overrides "
            f"on each architecture's own config): `{' '.join(overrides) or 'config defaults'}`. Single-task "
            f"reference: `{reference}` trained on each task alone with the same overrides and seeds. FLOPs: XLA's "
            f"count for the inference forward of every task (multiply-add = 2). Steps/s: median over logged "
            f"windows after the first, on a shared 2-core CPU machine under `nice -n 10`: compare within this table.")


def family_budget(family: str, smoke: bool, full: bool) -> tuple:
    """The overrides every run of ``family`` gets before the command line's."""
    if smoke:
        return SMOKE_BUDGET
    if full:
        return ()
    return MULTIMNIST_BUDGET if family == "multimnist" else FAMILY_BUDGET


def error_text(e: Exception) -> str:
    """'failed: TypeName: first line of the message' (at most 200 characters of it)."""
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"failed: {type(e).__name__}: {text}".replace("|", "/")


def enable_compile_cache(path: str) -> None:
    """jax's persistent compilation cache in ``path`` for every compilation (the train and eval steps of
    seeds after the first are then loaded, not compiled)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_previous(out: str) -> dict:
    """The JSON an earlier run wrote to ``out``.json ({} if none)."""
    return common.read_json(out + ".json", {})


def reusable(family: dict, settings: dict) -> dict | None:
    """An earlier run's family record when it used the same ``settings`` (overrides, seeds, baseline
    config file and its resolved contents)."""
    same = "single_task" in family and all(family.get(k) == v for k, v in settings.items())
    return family if same else None


def start_family(entry: Entry, arg: str, overrides: list, seeds: list, previous: dict, workdir: str,
                 command: str, train: bool = True) -> dict:
    """A family's record: its budget, tasks and single-task baselines (reused from ``previous`` when it
    used the same overrides, seeds and baseline config, with its architecture runs under 'earlier'),
    or ``{'error': ...}`` when the baselines fail (or are not in ``previous`` and ``train`` is False)."""
    baseline_spec = with_arg(entry.baseline, arg)
    record = {"overrides": overrides, "seeds": seeds, "baseline_config": baseline_spec,
              "baseline_resolved": resolved_config(baseline_spec, overrides)}
    old = reusable(previous, record)
    if not (old or train):
        return {**record, "error": NOT_RUN}
    try:
        tasks = architecture_cost(baseline_spec, overrides)["tasks"]
        single = old["single_task"] if old else single_task_baselines(baseline_spec, tasks, overrides, seeds, workdir)
    except Exception as e:  # noqa: BLE001 -- a family whose baselines fail is reported, the others run
        traceback.print_exc()
        return {**record, "error": error_text(e)}
    record["command"] = old.get("command", "") if old else command  # the invocation that trained the baselines
    return {**record, "tasks": tasks, "baselines": baseline_means(single), "single_task": single,
            "architectures": {}, "earlier": dict(old["architectures"]) if old else {}}


def render(dump: dict, command: str) -> list:
    """The markdown of every family's table (or its baselines' failure) and the command."""
    lines = []
    for name, family in dump.items():
        if "error" in family:
            lines += [f"### {name}: single-task baselines {family['error']}", ""]
            continue
        caption = caption_for(name, family["overrides"], family["seeds"], family["baseline_config"])
        lines += family_table(name, family["architectures"], family["tasks"], family["baselines"], caption) + [""]
    earlier = sorted({f.get("command") for f in dump.values() if f.get("command") not in (None, "", command)})
    reused = [f" Runs kept from `{c}` (same settings, --reuse / --report-only)." for c in earlier]
    return lines + [common.footer(command) + "".join(reused)]


def write_results(out: str, lines: list, dump: dict) -> None:
    """``out``.md (the tables) and ``out``.json (every run)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    common.write_text(out + ".md", "\n".join(lines) + "\n")
    common.write_json(out + ".json", {name: {k: v for k, v in fam.items() if k != "earlier"} for name, fam in dump.items()},
                      indent=2, default=dataclasses.asdict)


def rebaseline(previous: dict, entries: list, baseline_spec: str, workdir: str, out: str, command: str) -> list:
    """Δm% of the stored runs of ``entries`` (from ``--out``'s JSON) against another single-task
    reference, ``baseline_spec`` trained once per task and seed with the family's overrides (e.g. the
    ViT trunk of configs/multimnist_vit.py for the ViT-based models, whose stored Δm% is against
    LeNets). Writes ``out``.md / .json; the stored runs are not retrained."""
    from mtl_jax import tasks as T

    lines = []
    record = {}
    for name in dict.fromkeys(e.family for e in entries):
        family = previous.get(name)
        if not family or "single_task" not in family:
            raise SystemExit(f"--rebaseline: no stored runs of family '{name}' in the --out JSON")
        tasks = [T.TaskSpec(**t) if isinstance(t, dict) else t for t in family["tasks"]]
        single = single_task_baselines(baseline_spec, tasks, family["overrides"], family["seeds"],
                                       os.path.join(workdir, name, "rebaseline"))
        baselines = baseline_means(single)
        rows = ["| architecture | average accuracy | Δm% vs " + os.path.basename(baseline_spec) + " | Δm% vs "
                + os.path.basename(family["baseline_config"]) + " (stored) |", "|---|---|---|---|"]
        record[name] = {"baseline_config": baseline_spec, "baselines": baselines, "single_task": single,
                        "architectures": {}}
        for entry in (e for e in entries if e.family == name):
            runs = family["architectures"].get(entry.name, {}).get("runs", [])
            if not runs:
                continue
            deltas = [delta_m(r["results"], baselines, tasks) for r in runs]
            average = [100 * np.mean([r["results"][t.name][t.metrics[0]] for t in tasks]) for r in runs]
            record[name]["architectures"][entry.name] = deltas
            rows.append(f"| {entry.name} | {mean_std(average)} | {mean_std(deltas)} | "
                        f"{mean_std([r['delta_m'] for r in runs])} |")
        base = ", ".join(f"{t.name} {fmt_metric([baselines[t.name][t.metrics[0]]], t.metrics[0])}" for t in tasks)
        lines += [f"### {name}: stored runs against single-task {os.path.basename(baseline_spec)}", "",
                  f"Single-task baselines (same budget as the stored runs: {' '.join(family['overrides'])}; seeds "
                  f"{family['seeds']}): {base}.", ""] + rows + [""]
    lines += [common.footer(command)]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    common.write_text(out + ".md", "\n".join(lines) + "\n")
    common.write_json(out + ".json", record, indent=2, default=dataclasses.asdict)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="", help="comma list of architectures (default: all discovered)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--smoke", action="store_true", help="every config's :smoke (seconds per run)")
    parser.add_argument("--full", action="store_true", help="the configs' own budgets (no MULTIMNIST_BUDGET)")
    parser.add_argument("--configs", default=CONFIGS, help="directory to discover the architecture configs in")
    parser.add_argument("--workdir", default="runs/architectures")
    parser.add_argument("--compile-cache", default="", help="jax persistent compilation cache directory: seeds "
                        "after the first reuse the compiled steps (default <workdir>/jax_cache; 'off' disables)")
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "architectures"))
    parser.add_argument("--report-only", action="store_true", help="--reuse and train nothing: the tables of "
                        "the runs in --out's JSON (e.g. after a stopped run), the others marked 'not run'")
    parser.add_argument("--reuse", action="store_true", help="keep the runs already in --out's JSON that have the "
                        "same config, overrides and seeds (baselines, architectures); train the rest")
    parser.add_argument("--rebaseline", default="", metavar="CONFIG", help="train CONFIG's single-task runs with the "
                        "stored family's budget and report the stored runs of --archs (from --out's JSON) against them, "
                        "in --rebaseline-out; nothing else is trained")
    parser.add_argument("--rebaseline-out", default="", help="where --rebaseline writes its .md / .json")
    args, rest = parser.parse_known_args(argv)
    user = common.config_overrides(parser, rest)
    seeds = [int(s) for s in args.seeds.split(",")]
    entries = select(discover_entries(args.configs), args.archs)
    arg = "smoke" if args.smoke else ""
    if args.compile_cache != "off":
        enable_compile_cache(args.compile_cache or os.path.join(args.workdir, "jax_cache"))
    command = common.command_line(__spec__.name, common.argv_or_sys(argv))
    if args.rebaseline:
        if not args.rebaseline_out:
            raise SystemExit("--rebaseline needs --rebaseline-out (the stored --out tables stay as they are)")
        lines = rebaseline(load_previous(args.out), entries, args.rebaseline, args.workdir, args.rebaseline_out, command)
        print("\n".join(lines))
        return lines
    previous = load_previous(args.out) if args.reuse or args.report_only else {}
    dump = {}
    for entry in entries:  # in the order of --archs: a family's baselines are trained at its first entry
        if entry.family not in dump:
            overrides = list(family_budget(entry.family, args.smoke, args.full)) + user
            dump[entry.family] = start_family(entry, arg, overrides, seeds, previous.get(entry.family, {}),
                                              os.path.join(args.workdir, entry.family), command,
                                              train=not args.report_only)
        family = dump[entry.family]
        if "error" not in family:
            spec = with_arg(entry.config, arg)
            earlier = family.get("earlier", {}).get(entry.name, {})
            if earlier.get("config") == spec and earlier.get("resolved") == resolved_config(spec, family["overrides"]):
                family["architectures"][entry.name] = earlier
            else:
                family["architectures"][entry.name] = {"error": NOT_RUN} if args.report_only else run_or_error(
                    dataclasses.replace(entry, config=spec), family["overrides"], seeds, family["baselines"],
                    os.path.join(args.workdir, entry.family))
        lines = render(dump, command)
        write_results(args.out, lines, dump)  # after every architecture
    print("\n".join(lines))
    return {name: {k: v for k, v in fam.items() if k != "earlier"} for name, fam in dump.items()}


if __name__ == "__main__":
    common.run_main(main)
