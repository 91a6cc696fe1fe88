"""Loading is strict and loud, never unpickles code, and adapts position embeddings / channels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from medfm.downstream.load import LoadError, build_model, load_backbone, load_weights, read_release
from medfm.pretrain.backbones import build_backbone, pooled_features
from medfm.pretrain.release import ExportError, check_keys
from medfm.pretrain.runs import load_run


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pooled_features(model.eval(), x)


X = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


class Payload:
    """Pickles to a call that writes a marker file: what a malicious checkpoint does on an unsafe load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def malicious_pt(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"pos_embed": torch.zeros(1)}, "payload": Payload(marker)}, path)
    return path


def test_release_and_run_dir_load_the_same_weights_with_every_key(tiny_run: Path, tiny_release: Path):
    expected = features(load_run(tiny_run).backbone, X)
    for source in (tiny_release, tiny_run, tiny_release / "model.safetensors", tiny_run / "last.pt"):
        model = load_backbone(source)
        assert model.load_report.new_keys == ()
        torch.testing.assert_close(features(model, X), expected, rtol=0, atol=1e-6)
    assert load_backbone(tiny_release).pretrained_cfg["input_size"] == [1, 28, 28]


def test_the_only_keys_not_loaded_are_the_new_head(tiny_release: Path):
    model = load_backbone(tiny_release, num_classes=4)
    assert model.load_report.new_keys == ("head.bias", "head.weight")
    assert model(X).shape == (3, 4)
    random = load_backbone(tiny_release, num_classes=4, init="random")
    assert "blocks.0.attn.qkv.weight" in random.load_report.new_keys
    assert not torch.allclose(features(random, X), features(model, X))


def test_malicious_pickle_is_refused_and_runs_nothing(tiny_release: Path, tmp_path: Path):
    marker = tmp_path / "marker.txt"
    bare = malicious_pt(tmp_path / "weights.pt", marker)
    with pytest.raises(LoadError, match="refused"):
        load_backbone(bare, architecture="vit_tiny_patch16_224")
    release = tmp_path / "release"  # a release folder whose weights are a pickle
    release.mkdir()
    shutil.copy(tiny_release / "config.json", release / "config.json")
    malicious_pt(release / "pytorch_model.bin", marker)
    with pytest.raises(LoadError, match="refused"):
        load_backbone(release)
    run_dir = tmp_path / "run"  # a run directory whose last checkpoint is a pickle
    run_dir.mkdir()
    malicious_pt(run_dir / "last.pt", marker)
    with pytest.raises(LoadError, match="refused"):
        load_backbone(run_dir)
    assert not marker.exists()


def test_a_mismatched_architecture_names_the_keys(tiny_release: Path):
    release = read_release(tiny_release)
    deeper = build_model(release, depth=3)
    with pytest.raises(LoadError, match=r"missing from the weights \(\d+\): blocks\.2\.") as err:
        load_weights(deeper, release)
    assert "blocks.2.attn.qkv.weight" in str(err.value)
    wider_patches = build_model(release, patch_size=4)
    with pytest.raises(
        LoadError, match=r"shape mismatch.*patch_embed\.proj\.weight \(192, 1, 7, 7\) vs model \(192, 1, 4, 4\)"
    ):
        load_weights(wider_patches, release)


def test_resnet_weights_into_another_resnet_and_stray_keys(tmp_path: Path):
    weights = tmp_path / "resnet18.safetensors"
    save_file(build_backbone("resnet18", 32, 1).state_dict(), str(weights))
    assert load_backbone(weights, architecture="resnet18", in_chans=1).load_report.new_keys == ()
    with pytest.raises(LoadError, match=r"not in the model") as err:
        load_backbone(weights, architecture="resnet10t", in_chans=1)
    assert "layer1.1.conv1.weight" in str(err.value)
    extra = tmp_path / "extra.safetensors"
    state = load_file(str(weights))
    save_file({**state, "fc.weight": torch.zeros(2, 512)}, str(extra))
    with pytest.raises(LoadError, match=r"not in the model \(1\): fc\.weight"):
        load_backbone(extra, architecture="resnet18", in_chans=1)
    del state["layer4.1.bn2.running_var"]
    save_file(state, str(extra))
    with pytest.raises(LoadError, match=r"missing from the weights \(1\): layer4\.1\.bn2\.running_var"):
        load_backbone(extra, architecture="resnet18", in_chans=1)


def test_position_embeddings_are_resampled_for_another_size(tiny_release: Path):
    release = read_release(tiny_release)
    model = load_backbone(tiny_release, img_size=56)
    assert model.load_report.resampled == ("pos_embed",)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 192)
    expected = resample_abs_pos_embed(release.state_dict["pos_embed"], new_size=[8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert model.pretrained_cfg["input_size"] == [1, 56, 56]
    assert features(model, torch.rand(2, 1, 56, 56)).shape == (2, 192)
    # timm's own loader resamples the same way
    by_timm = timm.create_model(f"local-dir:{tiny_release}", pretrained=True, num_classes=0, img_size=56)
    torch.testing.assert_close(by_timm.pos_embed.detach(), model.pos_embed.detach())


def test_first_conv_is_adapted_to_three_channels(tiny_release: Path):
    gray = features(load_backbone(tiny_release), X)
    rgb = load_backbone(tiny_release, in_chans=3)
    assert rgb.load_report.resampled == ("patch_embed.proj.weight",)
    torch.testing.assert_close(features(rgb, X.expand(-1, 3, -1, -1)), gray, rtol=1e-4, atol=1e-5)


def test_unknown_sources_are_named(tmp_path: Path):
    with pytest.raises(LoadError, match="does not exist"):
        read_release(tmp_path / "nope")
    with pytest.raises(LoadError, match="neither a release folder"):
        read_release(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_args": {}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match="no 'architecture' key"):
        read_release(tmp_path)


def test_a_deepspeed_run_directory_asks_for_an_export_first(tmp_path: Path):
    """ZeRO checkpoints are directories of full pickles: downstream never opens them, `medfm export` does."""
    run_dir = tmp_path / "zero_run"
    (run_dir / "step-0000004").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("method: mae\n")
    (run_dir / "step-0000004" / "medfm.pt").write_bytes(b"not opened")
    with pytest.raises(LoadError, match=r"DeepSpeed ZeRO checkpoint.*medfm export"):
        load_backbone(run_dir)
    empty = tmp_path / "empty_run"  # a run that has not written a checkpoint yet
    empty.mkdir()
    (empty / "config.yaml").write_text("method: mae\n")
    with pytest.raises(LoadError, match="no checkpoint to export"):
        load_backbone(empty)


def test_a_pretraining_run_leaves_its_release_and_downstream_loads_it_with_every_key(tiny_run: Path, tiny_release):
    release = tiny_run / "release"
    assert sorted(p.name for p in release.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    expected = features(load_run(tiny_run).backbone, X)
    for source in (release, tiny_run):  # a finished run directory is read through its release
        assert read_release(source).source == release / "model.safetensors"
        model = load_backbone(source, num_classes=2)
        assert model.load_report.new_keys == ("head.bias", "head.weight")
        torch.testing.assert_close(features(model, X), expected, rtol=0, atol=1e-6)
    # The same release `medfm export` writes from the checkpoint.
    assert json.loads((release / "config.json").read_text()) == json.loads((tiny_release / "config.json").read_text())
    ours, exported = load_file(str(release / "model.safetensors")), load_file(str(tiny_release / "model.safetensors"))
    assert ours.keys() == exported.keys() and all(torch.equal(ours[k], exported[k]) for k in ours)


def test_a_run_whose_release_is_older_than_its_checkpoints_is_read_from_the_checkpoint(tiny_run: Path, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("eval", "finetune"))
    assert read_release(run_dir).source == run_dir / "release" / "model.safetensors"
    config = json.loads((run_dir / "release" / "config.json").read_text())
    config["medfm"]["steps"] = 2  # a resumed run that is still training: its checkpoints are newer
    (run_dir / "release" / "config.json").write_text(json.dumps(config))
    release = read_release(run_dir)
    assert release.source == run_dir / "last.pt" and release.info["steps"] == 4


def test_the_one_key_checker_names_missing_unexpected_and_misshaped_keys():
    model = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1), "head.weight": torch.zeros(1)}
    weights = {"a": torch.ones(2), "b": torch.ones(4), "d": torch.ones(1)}
    with pytest.raises(LoadError) as err:
        check_keys(model, weights, "w.safetensors", allowed_missing={"head.weight"})
    message = str(err.value)
    assert message.startswith("w.safetensors: weights do not match the model;")
    assert "missing from the weights (1): c;" in message and "head.weight" not in message
    assert "not in the model (1): d;" in message
    assert "shape mismatch (1): b (4,) vs model (3,)" in message
    with pytest.raises(ExportError, match=r"ZeRO-3 shards"):  # the export and method-state checks raise ExportError
        check_keys({"a": torch.zeros(2)}, {"a": torch.zeros(0)}, "ckpt.pt", error=ExportError)
    check_keys(
        model, {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)}, "w", allowed_missing={"head.weight"}
    )
