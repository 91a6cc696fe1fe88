"""Config faults (issue 21, items 3, 4, 5 config half, 10): what a hostile or careless config does now.

- A secret through interpolation: ``${oc.env:VAR}`` resolves in memory only. Every config medfm writes (run
  ``config.yaml``, checkpoints, TensorBoard / MLflow / wandb hyperparameters, the release's ``config.json`` and card)
  keeps the interpolation text, so no byte under the run or release folder holds the variable's value; the
  interpolation still works where it is used (``train.run_dir: ${oc.env:ROOT}/run``). Resolvers other than
  ``oc.env`` are a ``ConfigError`` naming the key (exit 2); a value that does not fit its key's type is named
  without echoing it.
- A YAML alias bomb (9 nested levels of 9 aliases) as ``--config``, or in a ``key=value`` argument: refused in
  well under a second as a ``ConfigError`` naming the file / key (exit 2) before any config is built, by every
  loader (pretrain, eval, finetune, bench quality). An unreadable YAML file is a ``ConfigError`` naming it.
- Non-finite numbers (``optim.base_lr=inf`` / ``nan``, any float of any section) and values outside a field's
  declared range (``augment.std=[0]``, ``augment.crop_scale=[0,0]``, a negative weight decay, betas outside
  [0, 1), a zero temperature, a probability above 1, ...): a ``ConfigError`` naming the key (exit 2), for the
  pretraining and the downstream configs.
- A control character in a path medfm creates (``train.run_dir``, ``out_dir`` of eval / finetune / bench quality,
  ``medfm shard --out``, ``medfm export --out``): a ``ConfigError`` / exit 2 naming the key or option, and no folder
  is created (a newline on the command line used to be folded into a space by YAML: another folder, silently).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medfm.benchmark import load_quality_config
from medfm.cli import main as medfm
from medfm.downstream.config import EvalConfig, FinetuneConfig
from medfm.downstream.config import load_config as load_downstream_config
from medfm.pretrain.config import ConfigError, load_config, tracker_installed

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ["data.spec=medmnist:x.npz", "train.run_dir=runs/x"]
DOWNSTREAM_REQUIRED = ["backbone.path=release", "data.spec=medmnist:x.npz", "out_dir=runs/x"]

SECRET = "medfm-planted-secret-6f1d0c2a9b"  # planted in the environment; must appear in no file medfm writes
SEED_SECRET = "3962451807"  # a used key (train.seed) taken from the environment


def config_error(load, *args) -> str:
    with pytest.raises(ConfigError) as info:
        load(*args)
    return str(info.value)


# --- 3. secrets through interpolation --------------------------------------------------------------------------


def test_a_secret_in_the_environment_reaches_no_file_of_the_run_or_the_release(
    tmp_path: Path, pretrain_overrides, monkeypatch, capsys, noise_npz
) -> None:
    """FAKE_AWS_SECRET_ACCESS_KEY referenced from an unused key (knn.spec) and a used one (train.seed) was written
    resolved into config.yaml, last.pt / step-*.pt, TensorBoard hparams, MLflow params and the wandb run."""
    monkeypatch.setenv("FAKE_AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MEDFM_TEST_SEED", SEED_SECRET)
    monkeypatch.setenv("MEDFM_TEST_ROOT", str(tmp_path / "runs"))
    trackers = [name for name in ("tensorboard", "mlflow", "wandb") if tracker_installed(name)]
    if "wandb" in trackers:
        monkeypatch.setenv("WANDB_MODE", "offline")
    if "mlflow" in trackers:  # the file store medfm would choose, set here so that the test leaves no variable behind
        monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "runs" / "run" / "mlruns").as_uri())
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "train:\n  run_dir: ${oc.env:MEDFM_TEST_ROOT}/run\n  seed: ${oc.env:MEDFM_TEST_SEED}\n"
        "knn:\n  spec: ${oc.env:FAKE_AWS_SECRET_ACCESS_KEY}\n"
    )
    overrides = [
        item
        for item in pretrain_overrides("mae", f"medmnist:{noise_npz(tmp_path / 'tiny.npz', n=16)}", tmp_path)
        if not item.startswith(("train.run_dir=", "logging.trackers="))
    ]
    overrides += ["data.samples_per_epoch=16", "checkpoint.every_steps=1", "logging.every_steps=1"]
    overrides.append(f"logging.trackers=[{','.join(trackers)}]")

    assert medfm(["pretrain", "--config", str(recipe), *overrides]) == 0
    run_dir = tmp_path / "runs" / "run"  # the interpolation works where it is used
    assert (run_dir / "last.pt").is_file() and any(run_dir.glob("step-*.pt"))
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert medfm(["export", str(run_dir), "--out", str(tmp_path / "release")]) == 0
    assert (tmp_path / "release" / "model.safetensors").is_file()

    leaks = [
        (str(path), secret)
        for path in sorted(tmp_path.rglob("*"))
        if path.is_file()
        for secret in (SECRET, SEED_SECRET)
        if secret.encode() in path.read_bytes()
    ]
    assert leaks == []
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    saved = (run_dir / "config.yaml").read_text()  # what was written: the interpolations, as the recipe has them
    assert "${oc.env:FAKE_AWS_SECRET_ACCESS_KEY}" in saved and "${oc.env:MEDFM_TEST_SEED}" in saved


def test_resolvers_other_than_oc_env_are_refused_naming_the_key(tmp_path: Path, capsys) -> None:
    """${oc.decode:...}, ${oc.create:...} or a custom resolver could run or build anything from a config."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("knn:\n  spec: ${oc.decode:'[1, 2]'}\n")
    assert medfm(["pretrain", "--config", str(recipe), *REQUIRED]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "'knn.spec'" in err and "oc.decode" in err
    message = config_error(load_config, None, [*REQUIRED, "model.init=${my_resolver:x}"])
    assert "'model.init'" in message and "my_resolver" in message
    message = config_error(
        load_downstream_config, EvalConfig, None, [*DOWNSTREAM_REQUIRED, "cache_dir=${oc.create:{}}"]
    )
    assert "'cache_dir'" in message


def test_an_interpolation_that_does_not_fit_its_key_is_named_without_its_value(monkeypatch) -> None:
    monkeypatch.setenv("FAKE_AWS_SECRET_ACCESS_KEY", SECRET)
    message = config_error(load_config, None, [*REQUIRED, "train.seed=${oc.env:FAKE_AWS_SECRET_ACCESS_KEY}"])
    assert "'train.seed'" in message and "${oc.env:FAKE_AWS_SECRET_ACCESS_KEY}" in message
    assert SECRET not in message
    message = config_error(load_config, None, [*REQUIRED, "knn.spec=${oc.env:MEDFM_SURELY_UNSET_VARIABLE}"])
    assert "'knn.spec'" in message and "MEDFM_SURELY_UNSET_VARIABLE" in message


# --- 4. YAML alias bomb ----------------------------------------------------------------------------------------

BOMB = "\n".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9 if prev else ['lol'] * 9)}]"
    for prev, name in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)
BOMB_FLOW = (
    "[&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
    "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]]"
)

# Each loader, in a child process (a regression hangs the child, not the suite): prints one line per loader.
LOADERS = """
import sys
from medfm.pretrain.config import ConfigError, load_config
from medfm.downstream.config import EvalConfig, FinetuneConfig, load_config as downstream
from medfm.benchmark import load_quality_config
bomb, flow = sys.argv[1], sys.argv[2]
for name, load in [("eval", lambda: downstream(EvalConfig, bomb)), ("finetune", lambda: downstream(FinetuneConfig, bomb)),
                   ("bench", lambda: load_quality_config(bomb)), ("override", lambda: load_config(None, ["knn.spec=" + flow]))]:
    try:
        load()
        print(name, "accepted")
    except ConfigError as err:
        print(name, "ConfigError", err)
"""


def test_a_yaml_alias_bomb_is_refused_before_the_config_is_built(tmp_path: Path) -> None:
    """450 bytes of nested anchors ran past 60 s at 1.4 GB (OmegaConf builds every expanded node)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB + "\n")
    assert len(BOMB) < 500
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        cli = subprocess.run(
            [sys.executable, "-m", "medfm.cli", "pretrain", "--config", str(bomb), *REQUIRED],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        loaders = subprocess.run(
            [sys.executable, "-c", LOADERS, str(bomb), BOMB_FLOW],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the alias bomb was expanded (still running after 90 s)")
    assert cli.returncode == 2, cli.stderr
    assert str(bomb) in cli.stderr and "alias" in cli.stderr and "Traceback" not in cli.stderr
    lines = loaders.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        [n, "ConfigError"] for n in ("eval", "finetune", "bench", "override")
    ], loaders.stderr
    assert all(str(bomb) in line for line in lines[:3]) and "knn.spec" in lines[3]


def test_aliases_within_the_budget_still_load(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("augment:\n  mean: &stats [0.5]\n  std: *stats\n")
    cfg = load_config(recipe, REQUIRED)
    assert list(cfg.augment.std) == [0.5]


@pytest.mark.parametrize("text", ["optim: [\n", "- 1\n- 2\n", "a: 1\na: 2\n"], ids=["unclosed", "list", "duplicate"])
def test_a_config_file_that_is_not_a_yaml_mapping_is_a_config_error_naming_it(tmp_path: Path, text: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert str(recipe) in config_error(load_config, recipe, REQUIRED)


# --- 5. non-finite and out-of-range numbers -----------------------------------------------------------------------


def test_a_non_finite_learning_rate_is_exit_2_naming_the_key(tmp_path: Path, capsys) -> None:
    """optim.base_lr=inf trained, wrote Infinity into metrics.jsonl and NaN weights into last.pt."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  base_lr: .inf\n")
    args = ["pretrain", "--config", str(recipe), "data.spec=medmnist:missing.npz", f"train.run_dir={tmp_path / 'run'}"]
    assert medfm(args) == 2
    assert "'optim.base_lr'" in capsys.readouterr().err
    assert medfm([*args, "optim.base_lr=inf"]) == 2
    assert "'optim.base_lr'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.base_lr=nan", "optim.base_lr"),
        ("optim.base_lr=-inf", "optim.base_lr"),
        ("optim.min_lr=.nan", "optim.min_lr"),
        ("dino.teacher_temp=inf", "dino.teacher_temp"),  # a method's section: every float of the schema
        ("model.backbone_kwargs.drop_rate=.inf", "model.backbone_kwargs.drop_rate"),
        ("augment.std=[0]", "augment.std"),
        ("augment.crop_scale=[0,0]", "augment.crop_scale"),
        ("augment.crop_scale=[0.5,1.5]", "augment.crop_scale"),
        ("augment.crop_ratio=[0,1]", "augment.crop_ratio"),
        ("augment.hflip=1.5", "augment.hflip"),
        ("augment.blur_sigma=[0,1]", "augment.blur_sigma"),
        ("optim.base_lr=-1e-3", "optim.base_lr"),
        ("optim.weight_decay=-0.05", "optim.weight_decay"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("knn.temperature=0", "knn.temperature"),
        ("logging.every_steps=0", "logging.every_steps"),
    ],
)
def test_pretraining_numbers_outside_their_range_are_named(override: str, key: str) -> None:
    message = config_error(load_config, None, [*REQUIRED, override])
    assert f"'{key}'" in message


@pytest.mark.parametrize(
    ("schema", "override", "key"),
    [
        (EvalConfig, "knn.temperature=inf", "knn.temperature"),
        (EvalConfig, "linear.weight_decays=[1e-4,-1]", "linear.weight_decays"),
        (EvalConfig, "data.val_fraction=nan", "data.val_fraction"),
        (FinetuneConfig, "train.lr=nan", "train.lr"),
        (FinetuneConfig, "train.weight_decay=-1", "train.weight_decay"),
        (FinetuneConfig, "train.drop_path=inf", "train.drop_path"),
        (FinetuneConfig, "augment.hflip=2", "augment.hflip"),
        (FinetuneConfig, "augment.blur_sigma=[0,1]", "augment.blur_sigma"),
    ],
)
def test_downstream_numbers_outside_their_range_are_named(schema: type, override: str, key: str) -> None:
    message = config_error(load_downstream_config, schema, None, [*DOWNSTREAM_REQUIRED, override])
    assert f"'{key}'" in message


def test_every_shipped_config_is_within_the_ranges() -> None:
    for recipe in sorted((REPO / "configs" / "pretrain").glob("*.yaml")):
        load_config(recipe, ["data.spec=medmnist:x.npz", "train.run_dir=runs/x"])
    for recipe in sorted((REPO / "configs" / "downstream").glob("*.yaml")):
        schema = FinetuneConfig if recipe.name.startswith("finetune") else EvalConfig
        load_downstream_config(schema, recipe, DOWNSTREAM_REQUIRED)
    load_quality_config(REPO / "bench" / "quality.yaml")


# --- 10. control characters in the paths medfm creates ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["pretrain", "--config", "EMPTY", "data.spec=medmnist:missing.npz", "train.run_dir=OUT"], "'train.run_dir'"),
        (["eval", "--backbone", "missing", "--data", "medmnist:missing.npz", "--out", "OUT"], "'out_dir'"),
        (["finetune", "--backbone", "missing", "--data", "medmnist:missing.npz", "--out", "OUT"], "'out_dir'"),
        (
            ["eval", "--backbone", "missing", "--data", "medmnist:missing.npz", "--out", "x", "cache_dir=OUT"],
            "'cache_dir'",
        ),
        (["bench", "quality", "--config", "BENCH", "--out", "OUT"], "'out_dir'"),
        (["shard", "missing_folder", "--out", "OUT"], "--out"),
        (["shard", "merge", "missing_part", "--out", "OUT"], "--out"),
        (["export", "missing_run", "--out", "OUT"], "--out"),
    ],
    ids=["pretrain", "eval", "finetune", "eval-cache", "bench", "shard", "shard-merge", "export"],
)
@pytest.mark.parametrize("character", ["\n", "\r", "\x1b", "\u2028"], ids=["newline", "return", "escape", "line-sep"])
def test_a_control_character_in_a_created_path_is_exit_2_naming_it(
    tmp_path: Path, monkeypatch, capsys, argv: list[str], named: str, character: str
) -> None:
    """train.run_dir=$'runs/a\\nb' trained into 'runs/a b' (YAML folds the newline): another folder, silently."""
    monkeypatch.chdir(tmp_path)
    bench = tmp_path / "bench.yaml"  # fails its own checks later (no such recipe file): nothing would run
    bench.write_text(
        "pool: {sources: [sample:]}\nrecipes: [{name: r, config: missing.yaml}]\ntasks: [{name: t, spec: x}]\n"
    )
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    out = f"runs/a{character}b"
    argv = [a.replace("OUT", out).replace("BENCH", str(bench)).replace("EMPTY", str(empty)) for a in argv]
    assert medfm(argv) == 2
    assert named in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.yaml", "empty.yaml"]  # no folder was created


def test_a_control_character_from_a_yaml_file_or_the_environment_is_named(tmp_path: Path, monkeypatch) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text('train:\n  run_dir: "runs/a\\nb"\n')
    assert "'train.run_dir'" in config_error(load_config, recipe, ["data.spec=medmnist:x.npz"])
    monkeypatch.setenv("MEDFM_TEST_ROOT", "runs/a\nb")
    message = config_error(load_config, None, ["data.spec=medmnist:x.npz", "train.run_dir=${oc.env:MEDFM_TEST_ROOT}/r"])
    assert "'train.run_dir'" in message
