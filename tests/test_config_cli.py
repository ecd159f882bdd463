"""Config values checked at start (mtl_jax.config.SCHEMA), ``:arg`` parsing, and the command line's
one-line errors with exit codes 2 (usage) / 1 (runtime) / 130 (Ctrl-C)."""

import errno
import os
import subprocess
import sys

import pytest

from mtl_jax import config as C
from mtl_jax.config import check_against_dataset, check_config, default_config, load_config, parse_arg
from mtl_jax.errors import UsageError
from mtl_jax.main import describe_error, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, "configs", "digits_mlp.py")
HINT = " (run with --verbose for the traceback)"

# (override, the key path the error must name): each value outside its valid range or type.
BAD_VALUES = [
    ("num_steps=0", "num_steps"), ("num_steps=-5", "num_steps"), ("num_epochs=0", "num_epochs"),
    ("seed=1.5", "seed"), ("seed=-1", "seed"), ("seed=True", "seed"),
    ("batch_size=0", "batch_size"), ("eval_batch_size=0", "eval_batch_size"), ("log_every=0", "log_every"),
    ("eval_every=-1", "eval_every"), ("checkpoint.every=0", "checkpoint.every"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("checkpoint.enabled=3", "checkpoint.enabled"), ("max_nonfinite_steps=0", "max_nonfinite_steps"),
    ("optim.lr=-0.1", "optim.lr"), ("optim.lr=1e400", "optim.lr"), ("optim.b1=1.0", "optim.b1"),
    ("optim.b2=-0.1", "optim.b2"),
    ("optim.eps=0", "optim.eps"), ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.grad_clip_norm=-1", "optim.grad_clip_norm"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.warmup_steps=2.5", "optim.warmup_steps"), ("optim.momentum=1", "optim.momentum"),
    ("optim.name='lamb'", "optim.name"), ("optim.schedule='steps'", "optim.schedule"), ("optim.decay_factor=0", "optim.decay_factor"),
    ("sharpness.rho=-0.1", "sharpness.rho"), ("sharpness.kind='asam'", "sharpness.kind"),
    ("mesh.data=0", "mesh.data"), ("mesh.data=-2", "mesh.data"), ("mesh.model=0", "mesh.model"),
    ("mesh.expert=0", "mesh.expert"),
    ("data.num_train=0", "data.num_train"), ("data.num_test=0", "data.num_test"), ("data.seed=-3", "data.seed"),
    ("jacobian.chunk=-1", "jacobian.chunk"), ("jacobian.level='layer'", "jacobian.level"),
    ("jacobian.gramian_mode='full'", "jacobian.gramian_mode"),
    ("rep_mtl.tsr_weight=-1", "rep_mtl.tsr_weight"), ("rep_mtl.csa_weight=-1", "rep_mtl.csa_weight"),
    ("rep_mtl.temperature=0", "rep_mtl.temperature"), ("progress_bar='yes'", "progress_bar"),
    ("head_optim.digit.lr=-1", "head_optim.digit.lr"), ("head_optim.digit.b1=1.5", "head_optim.digit.b1"),
    ("head_optim.digit.name='lamb'", "head_optim.digit.name"), ("head_optim.digit.lrr=0.1", "head_optim.digit.lrr"),
]


@pytest.mark.parametrize("override,key", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_refused_naming_the_key(override, key):
    with pytest.raises(UsageError) as info:
        load_config(DIGITS, [override])
    message = str(info.value.args[0])
    assert f"'{key}'" in message and "\n" not in message, message
    assert "expected" in message or "expects" in message or "valid" in message, message


def test_values_at_the_edge_of_their_range_are_accepted():
    config = load_config(DIGITS, ["num_steps=1", "optim.lr=0", "optim.b1=0", "eval_every=0", "mesh.data=-1",
                                  "jacobian.chunk=0", "optim.warmup_steps=0", "head_optim.digit.lr=0",
                                  "head_optim.parity.schedule=None"])
    assert config.num_steps == 1 and config.optim.lr == 0.0
    assert load_config(DIGITS, ["num_steps=1e3"]).num_steps == 1000  # an integral float is no truncation
    assert load_config(DIGITS, ["num_steps=None"]).num_steps is None
    assert load_config(DIGITS, ["optim.lr=1"]).optim.lr == 1.0 and load_config(DIGITS, ["seed=7"]).seed == 7


def test_messages_name_value_and_range():
    with pytest.raises(UsageError, match=r"^config key 'checkpoint.every' = 0 is invalid: expected an int >= 1$"):
        load_config(DIGITS, ["checkpoint.every=0"])
    with pytest.raises(UsageError, match=r"'optim.b2' = 1.5 is invalid: expected a finite float in \[0, 1\)"):
        load_config(DIGITS, ["optim.b2=1.5"])
    with pytest.raises(UsageError, match=r"'seed' expects an int, got 1.5 \(not truncated\)"):
        load_config(DIGITS, ["seed=1.5"])
    with pytest.raises(UsageError, match=r"'num_steps' = 0 is invalid: expected an int >= 1 or None"):
        load_config(DIGITS, ["num_steps=0"])
    with pytest.raises(UsageError, match=r"unknown optimiser 'lamb'; valid names: \['adam', 'adamw', 'sgd'\]"):
        load_config(DIGITS, ["optim.name='lamb'"])


def test_check_config_on_a_config_built_in_python():
    config = default_config()
    check_config(config)
    config.seed = 2
    config.num_epochs = -1.0
    with pytest.raises(UsageError, match="'num_epochs' = -1.0"):
        check_config(config)
    config = default_config()
    config.head_optim = {"left": {"lr": -1.0}}
    with pytest.raises(UsageError, match="'head_optim.left.lr' = -1.0"):
        check_config(config)


def test_choice_lists_match_the_registries():
    from mtl_jax.models.pretrained import registry as pretrained_registry
    from mtl_jax.train import flat_minima, optim, precision
    from mtl_jax.train.gradients import options

    assert set(C.OPTIMIZERS) == set(optim.OPTIMIZERS)
    assert set(C.SHARPNESS_KINDS) == set(flat_minima.KINDS) and set(C.GRAMIAN_MODES) == set(options.GRAMIAN_MODES)
    assert set(C.SCHEMA["precision"].choices) == set(precision.DTYPES)
    assert set(C.PRETRAINED_TRUNKS) == {""} | set(pretrained_registry.PRETRAINED)
    cfg = default_config().optim
    for name in C.SCHEDULES:
        cfg.schedule = name
        optim.make_optimizer(cfg, 10)
    cfg.schedule = "no_such_schedule"
    with pytest.raises(ValueError, match=r"unknown schedule 'no_such_schedule'; valid names: \['constant', 'cosine', "
                                         r"'linear', 'step'\]"):
        optim.make_optimizer(cfg, 10)


def test_step_schedule_is_torch_step_lr():
    """'step': lr * decay_factor ** floor(step / decay_every) (torch StepLR); decay_every 0 = half the run."""
    from mtl_jax.train import optim

    cfg = default_config().optim
    cfg.update(dict(lr=1e-4, schedule="step", decay_every=100, decay_factor=0.5))
    lr = optim._schedule(cfg, 1000)
    assert [float(lr(s)) for s in (0, 99, 100, 199, 200)] == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5])
    cfg.decay_every = 0
    lr = optim._schedule(cfg, 400)
    assert float(lr(199)) == pytest.approx(1e-4) and float(lr(200)) == pytest.approx(5e-5)


def test_parse_arg_refuses_unknown_keys_and_types_values():
    with pytest.raises(UsageError, match=r"unknown config argument 'smok' in ':smok'; valid arguments: \['smoke'\]"):
        load_config(f"{DIGITS}:smok")
    multimnist = os.path.join(REPO, "configs", "multimnist.py")
    with pytest.raises(UsageError, match=r"'smok'.*\['smoke', 'task'\]"):
        load_config(f"{multimnist}:smok")
    with pytest.raises(UsageError, match=r"'smok'.*\['smoke', 'task'\]"):  # a config that forwards its arg
        load_config(os.path.join(REPO, "configs", "multimnist_cgc.py") + ":smok")
    config = load_config(f"{multimnist}:smoke,task=left")
    assert config.num_steps == 20 and config.data.tasks == ("left",)
    assert load_config(f"{multimnist}:task=left,smoke=false").num_steps is None
    arg = parse_arg("smoke,n=3,lr=1,name=x,extra=[4]", smoke=False, n=1, lr=0.1, name="", extra=None)
    assert (arg.smoke, arg.n, arg.lr, arg.name, arg.extra) == (True, 3, 1.0, "x", [4]) and isinstance(arg.lr, float)
    assert parse_arg(None, smoke=False).smoke is False and parse_arg("smoke=True", smoke=False).smoke is True
    for bad, match in [("smoke=maybe", "'smoke' expects true or false"), ("n", "'n' needs a value"),
                       ("n=1.5", r"'n' expects an int, got 1.5"), ("lr=fast", "'lr' expects float"),
                       ("seed=1", r"unknown config argument 'seed'.*\['lr', 'n', 'smoke'\]")]:
        with pytest.raises(UsageError, match=match):
            parse_arg(bad, smoke=False, n=1, lr=0.1)


def test_merge_configs_take_smoke():
    for name in ("ties_example.py", "dare_example.py", "vit_benchmark.py"):
        path = os.path.join(REPO, "configs", "merge", name)
        assert C.config_from_file(f"{path}:smoke") != C.config_from_file(path)
        with pytest.raises(UsageError, match=r"'smok'.*\['smoke'\]"):
            C.config_from_file(f"{path}:smok")


def test_check_against_dataset():
    config = load_config(DIGITS, ["batch_size=64", "eval_batch_size=512"])
    check_against_dataset(config, {"train": 64, "test": 100})  # an eval split smaller than its batch is padded
    check_against_dataset(config, {"train": 1000, "test": 100}, batch_shards=8)
    with pytest.raises(UsageError, match=r"'batch_size' = 64 is invalid: larger than the 63 examples of the 'train'"):
        check_against_dataset(config, {"train": 63, "test": 100})
    with pytest.raises(UsageError, match=r"'eval_split' = 'test' is invalid: expected one of \['train', 'val'\]"):
        check_against_dataset(config, {"train": 1000, "val": 100})
    with pytest.raises(UsageError, match=r"'eval_split' = 'test' is invalid: the split is empty"):
        check_against_dataset(config, {"train": 1000, "test": 0})
    with pytest.raises(UsageError, match=r"'batch_size' = 64 is invalid: expected a multiple of the 6 devices"):
        check_against_dataset(config, {"train": 1000, "test": 100}, batch_shards=6)
    with pytest.raises(UsageError, match=r"no 'train' split; splits: \['test'\]"):
        check_against_dataset(config, {"test": 100})


class _Stop(FloatingPointError):
    pass


@pytest.mark.parametrize("error,code,message", [
    (UsageError("workdir '/w' is in use\nby pid 3"), 2, "workdir '/w' is in use"),
    (C.UnknownKeyError("unknown config key 'x'"), 2, "unknown config key 'x'"),
    (KeyError("unknown config key 'y'"), 2, "unknown config key 'y'"),
    (FileNotFoundError("config file 'a.py' not found"), 2, "config file 'a.py' not found"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b"), 2, "No such file or directory: '/a/b'"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/ckpt"), 1, "No space left on device: '/full/ckpt'"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), 1, "Invalid cross-device link: '/a' -> '/b'"),
    (OSError("disk went away"), 1, "disk went away"),
    (_Stop("4 consecutive steps with a NaN/Inf loss\nmore"), 1, "4 consecutive steps with a NaN/Inf loss"),
    (ZeroDivisionError("integer modulo by zero"), 1, "ZeroDivisionError: integer modulo by zero" + HINT),
    (RuntimeError("first line\n\nsecond line"), 1, "RuntimeError: first line" + HINT),
    (TypeError(), 1, "TypeError" + HINT),
])
def test_describe_error(error, code, message):
    assert describe_error(error) == (code, message)


def _run_in_process(monkeypatch, capsys, error, argv=()):
    def fail(argv):
        raise error

    monkeypatch.setattr("mtl_jax.main.main", fail)
    with pytest.raises(SystemExit) as info:
        run(list(argv))
    return info.value.code, capsys.readouterr().err


def test_run_one_line_per_failure(monkeypatch, capsys):
    code, err = _run_in_process(monkeypatch, capsys, OSError(errno.ENOSPC, "No space left on device", "/full"))
    assert (code, err) == (1, "mtl-jax: error: No space left on device: '/full'\n")
    code, err = _run_in_process(monkeypatch, capsys, KeyboardInterrupt())
    assert (code, err) == (130, "mtl-jax: error: interrupted\n")
    code, err = _run_in_process(monkeypatch, capsys, ValueError("bad\nworse"), ["--verbose"])
    assert code == 1 and err.startswith("Traceback (most recent call last)")
    assert err.endswith("\nmtl-jax: error: ValueError: bad\n")  # no hint: the traceback is there


# --- the command line as a subprocess -------------------------------------------------------------------

def _cli(*args, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "mtl_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)
    return proc.returncode, proc.stderr.splitlines()


@pytest.mark.parametrize("args,code,message", [
    (["--config=configs/digits_mlp.py:smok", "--workdir=unused"], 2,
     "unknown config argument 'smok' in ':smok'; valid arguments: ['smoke']"),
    (["--config=configs/no_such_config.py", "--workdir=unused"], 2,
     "config file 'configs/no_such_config.py' not found"),
    (["--config=configs/digits_mlp.py:smoke", "--workdir=unused", "--config.checkpoint.every=0"], 2,
     "config key 'checkpoint.every' = 0 is invalid: expected an int >= 1"),
    (["--config=configs/digits_mlp.py:smoke", "--workdir=unused", "--config.optim.lrr=1"], 2,
     "unknown config key 'optim.lrr'; valid keys under 'optim': "),
    (["merge", "--config=configs/merge/ties_example.py:smok", "--verbose"], 2,
     "unknown config argument 'smok' in ':smok'; valid arguments: ['smoke']"),
], ids=["unknown-arg", "missing-config", "checkpoint-every-0", "unknown-key", "merge-unknown-arg-verbose"])
def test_cli_usage_errors_are_one_line_exit_2(args, code, message):
    rc, err = _cli(*args)
    if "--verbose" in args:
        assert err[0] == "Traceback (most recent call last):", err
        err = err[-1:]
    assert (rc, len(err)) == (code, 1), err
    assert err[0].startswith("mtl-jax: error: " + message), err


def test_cli_runtime_oserror_names_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    workdir = str(blocker / "run")
    rc, err = _cli(f"--config={DIGITS}:smoke", f"--workdir={workdir}", "--config.progress_bar=False")
    assert (rc, err) == (1, [f"mtl-jax: error: Not a directory: '{workdir}'"])
    rc, err = _cli(f"--config={DIGITS}:smoke", f"--workdir={workdir}", "--verbose")
    assert rc == 1 and err[0] == "Traceback (most recent call last):" and "NotADirectoryError" in err[-2], err
    assert err[-1] == f"mtl-jax: error: Not a directory: '{workdir}'"


# --- the command line parsed by absl flags + ml_collections.config_flags, in process ----------------------

def test_parse_runs_many_times_in_one_process():
    from mtl_jax.main import parse

    for spec, steps in ((f"{DIGITS}:smoke", 20), (DIGITS, None), (f"{DIGITS}:smoke=false", None)):
        config, workdir, overrides = parse(["train", "--config.seed=3", f"--config={spec}", "--workdir", "w"])
        assert (config.num_steps, config.data.name, workdir, overrides) == (steps, "digits", "w", ["seed=3"])
        assert C.prepare_config(config, overrides).seed == 3
    assert f"{C.CONFIG_FLAG}_config" not in sys.modules  # config_flags' module of the file is not left behind


@pytest.mark.parametrize("argv,error,message", [
    (["--workdir=w"], UsageError, r"^flag --config is required"),
    ([f"--config={DIGITS}"], UsageError, r"^flag --workdir=None: Flag --workdir must have a value"),
    ([f"--config={DIGITS}", "--workdir=w", "--wrokdir=v"], UsageError, r"^Unknown command line flag 'wrokdir'"),
    (["trian", f"--config={DIGITS}", "--workdir=w"], UsageError, r"^unknown command 'trian'; valid commands: "),
    (["--config=no_such.py", "--workdir=w"], FileNotFoundError, r"^config file 'no_such.py' not found$"),
    ([f"--config={DIGITS}:smok", "--workdir=w"], UsageError, r"^unknown config argument 'smok' in ':smok'"),
])
def test_parse_errors_are_one_line(argv, error, message):
    from mtl_jax.main import parse

    with pytest.raises(error, match=message) as info:
        parse(argv)
    code, line = describe_error(info.value)
    assert code == 2 and "\n" not in str(info.value), (code, line)


def test_an_oserror_of_get_config_is_raised_as_raised(tmp_path):
    path = tmp_path / "reads_a_file.py"
    path.write_text("def get_config(arg=None):\n    open('/no/such/dir/baselines.json')\n")
    with pytest.raises(FileNotFoundError) as info:
        C.parse_command_line([f"--config={path}"])
    assert describe_error(info.value) == (2, "No such file or directory: '/no/such/dir/baselines.json'")


def test_dataset_keys_come_from_the_dataset_modules():
    from mtl_jax.data import datasets, wiki

    for name, entry in datasets.DATASETS.items():
        assert callable(entry["load"]) and set(entry) <= {"load", "options", "rules"}, name
        assert set(entry.get("rules", {})) <= set(entry.get("options", {})), name
        assert not set(entry.get("options", {})) & set(default_config().data), name  # not the common keys
    assert datasets.dataset_options("wiki") == (wiki.OPTIONS, wiki.RULES)
    assert datasets.dataset_options("no_such_dataset") == ({}, {})
    assert datasets.default_data_dir()  # still importable from datasets (defined in tfds_builders)
    config = C.apply_overrides(default_config(), ["data.name='wiki'", "data.num_nationalities=1"])
    with pytest.raises(UsageError, match=r"^config key 'data.num_nationalities' = 1 is invalid: expected an int >= 2$"):
        check_config(config)
    with pytest.raises(UsageError, match=r"'data.num_features' = 0 is invalid: expected an int >= 1"):
        load_config(os.path.join(REPO, "configs", "multitab_bench.py"), ["data.num_features=0"])
    with pytest.raises(C.UnknownKeyError, match=r"unknown config key 'data.max_len'; valid keys under 'data': \[.*'num_tr"):
        load_config(DIGITS, ["data.max_len=64"])  # a wiki key, refused for another dataset


def test_config_module_imports_neither_jax_nor_tfds():
    """The data registry is asked lazily: importing mtl_jax.config, and loading a config that names no
    dataset-specific key, import neither jax nor tensorflow_datasets."""
    code = ("import sys; from mtl_jax.config import load_config; load_config('configs/digits_mlp.py:smoke', "
            "['optim.lr=0.1']); print(sorted(m for m in ('jax', 'tensorflow_datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_help_lists_the_flags(capsys):
    from mtl_jax.main import main

    assert main(["train", "--help"]) is None
    out = capsys.readouterr().out
    assert "--workdir" in out and "--config: configs/<file>.py[:arg]" in out and "--[no]verbose" in out
