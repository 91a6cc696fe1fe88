"""``medfm demo``: the whole chain (shard, inspect, pretrain, eval against random init, export, report) on the
embedded sample images with a tiny labeled set, shrunk to seconds by pretraining overrides."""

from __future__ import annotations

import medfm.demo as demo
from medfm.cli import main as medfm

TINY = [
    "data.samples_per_epoch=32",
    "train.batch_size=8",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0",
    "checkpoint.every_steps=2",
    "logging.every_steps=1",
    "logging.figure_every_steps=2",
    "model.backbone_kwargs.depth=2",
    "logging.progress_bar=false",
]


def test_the_demo_runs_the_chain_and_writes_a_report(tmp_path, capsys, binary_npz):
    labeled = binary_npz(tmp_path / "labeled.npz", n=48)
    out = tmp_path / "demo"
    assert medfm(["demo", "--out", str(out), "--labeled", f"medmnist:{labeled}", *TINY]) == 0
    printed = capsys.readouterr().out
    assert f"labeled evaluation on medmnist:{labeled} (given with --labeled)" in printed
    assert "the train images of" in printed and "without their labels" in printed
    for number, stage in enumerate(("shard", "shard inspect", "pretrain", "eval", "export"), 1):
        assert f"[{number}/5 " in printed and f"$ medfm {stage}" in printed
    assert "| release |" in printed and "| random |" in printed  # the results table in the terminal
    report = (out / "report" / "report.md").read_text()
    for section in (
        "## Results on",
        "## Sample grid",
        "## Training curves",
        "## MAE reconstructions",
        "## ROC (linear probe, release)",
        "## Embedding",
    ):
        assert section in report, section
    for line in report.splitlines():
        if line.startswith("!["):
            assert (out / "report" / line.split("](")[1].rstrip(")")).is_file(), line
    card = (out / "release" / "README.md").read_text()
    assert "linear" in card and "knn" in card  # the release's card lists the evaluation


def test_without_a_labeled_set_the_demo_says_so_and_skips_only_the_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "shared_data_folders", lambda: [tmp_path / "nowhere"])
    plan = demo.plan_demo(str(tmp_path / "demo"), None, None, True, [])
    assert plan.labeled is None and plan.pool == ["sample:"]
    assert [argv[0] for _, argv in plan.steps()] == ["shard", "shard", "pretrain", "export"]
    said: list[str] = []
    demo.run_demo(plan, lambda argv: 7, said.append)
    assert "the labeled evaluation is skipped" in said[0] and str(tmp_path / "nowhere") in said[0]
    assert "failed with exit code 7" in said[-1]


def test_a_labeled_set_is_found_in_the_shared_data_folder(tmp_path, monkeypatch, binary_npz):
    (tmp_path / "medmnist").mkdir()
    binary_npz(tmp_path / "medmnist" / "breastmnist.npz")
    monkeypatch.setenv("MEDFM_SHARED_DATA", str(tmp_path))
    monkeypatch.setattr(demo, "REPO", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    plan = demo.plan_demo("out", ["imagefolder:/x"], None, False, [])
    assert plan.labeled == f"medmnist:{tmp_path / 'medmnist' / 'breastmnist.npz'}" and plan.labeled_found
    assert plan.pool == ["imagefolder:/x"]  # --no-pool-labeled
