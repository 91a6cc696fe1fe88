"""Hub-grade releases: the model card's front matter (``huggingface_hub.ModelCardData``) and ``medfm export
--push-to-hub`` against a mock of the Hub's HTTP layer (no network: every request is answered in-process)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import ModelCard, constants, set_client_factory
from huggingface_hub.utils import _http

from medfm.cli import main
from medfm.pretrain.main import pretrain
from medfm.pretrain.release import hub_base_model, write_results_summary


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pneumonia: Path, pretrain_overrides, reset_accelerate) -> Path:
    """A tiny finished run with a linear-probe result of its release (and a random-init one) beside it."""
    run = tmp_path_factory.mktemp("hub") / "run"
    assert pretrain(None, pretrain_overrides("simclr", f"medmnist:{pneumonia}", run)) == 0
    reset_accelerate()
    spec = f"medmnist:{pneumonia}"
    summary = {"acc": 0.85, "balanced_acc": 0.8, "auc": 0.93, "f1": 0.88}
    write_results_summary(run / "eval/release/linear", protocol="linear", dataset=spec, init="release", summary=summary)
    write_results_summary(run / "eval/random/linear", protocol="linear", dataset=spec, init="random", summary=summary)
    return run


class MockHub:
    """The Hub endpoints that ``create_repo`` + ``upload_folder`` call, answered in-process; records requests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.commits: list[list[dict]] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        body, path = request.read(), request.url.path
        self.calls.append((request.method, path))
        if path == "/api/repos/create":
            self.created.append(json.loads(body))
            name = "/".join(filter(None, (self.created[-1].get("organization"), self.created[-1]["name"])))
            return httpx2.Response(200, json={"url": f"{constants.ENDPOINT}/{name}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/main", path):
            files = json.loads(body)["files"]
            return httpx2.Response(
                200,
                json={
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]
                },
            )
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/commit/main", path):
            self.commits.append([json.loads(line) for line in body.splitlines() if line.strip()])
            oid = hashlib.sha1(body).hexdigest()
            return httpx2.Response(
                200,
                json={
                    "commitUrl": f"{constants.ENDPOINT}/{'/'.join(path.split('/')[3:5])}/commit/{oid}",
                    "commitOid": oid,
                },
            )
        return httpx2.Response(404, json={"error": f"not mocked: {request.method} {path}"})

    def committed_files(self) -> dict[str, bytes]:
        return {
            item["value"]["path"]: base64.b64decode(item["value"]["content"])
            for lines in self.commits
            for item in lines
            if item["key"] == "file"
        }


@pytest.fixture
def hub(monkeypatch) -> MockHub:
    mock = MockHub()
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain HTTP uploads, no xet session
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(mock.handle)))
    yield mock
    set_client_factory(_http.default_client_factory)


def test_the_card_front_matter_is_what_the_hub_reads(run_dir: Path, tmp_path: Path) -> None:
    assert main(["export", str(run_dir), "--out", str(tmp_path / "rel"), "--license", "cc-by-4.0"]) == 0
    card = ModelCard.load(tmp_path / "rel" / "README.md")
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("cc-by-4.0", "timm", "image-feature-extraction")
    assert data.base_model is None  # trained from scratch
    assert "pneumoniamnist" in data.datasets
    (result,) = {(r.dataset_name, r.dataset_split, r.task_type) for r in data.eval_results}
    assert result == ("pneumoniamnist", "test", "image-classification")
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics == {"accuracy": 0.85, "balanced_accuracy": 0.8, "roc_auc": 0.93, "f1": 0.88}
    assert len(data.eval_results) == 4  # the random-init row is a comparison, not a result of this model
    assert "# resnet" not in card.text and "medfm.load_backbone" in card.text


def test_base_model_is_the_warm_start_hub_id() -> None:
    assert hub_base_model(None) is None
    assert (
        hub_base_model({"source": "hf-hub:timm/vit_small_patch14_dinov2.lvd142m@main"})
        == "timm/vit_small_patch14_dinov2.lvd142m"
    )
    cached = "/root/.cache/huggingface/hub/models--facebook--dinov2-small/snapshots/abc123"
    assert hub_base_model({"source": cached}) == "facebook/dinov2-small"
    assert hub_base_model({"source": "/data/weights/mae_vitb.pth"}) is None


def test_export_push_to_hub_uploads_the_release_folder(run_dir: Path, tmp_path: Path, hub: MockHub, capsys) -> None:
    out = tmp_path / "rel"
    assert main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "lab/chest-simclr"]) == 0
    (created,) = hub.created
    assert (created["organization"], created["name"], created["visibility"]) == ("lab", "chest-simclr", "private")
    files = hub.committed_files()
    assert set(files) == {"model.safetensors", "config.json", "README.md"}
    for name, content in files.items():
        assert content == (out / name).read_bytes(), name
    assert f"pushed to the Hugging Face Hub: {constants.ENDPOINT}/lab/chest-simclr/commit/" in capsys.readouterr().out


def test_push_offline_fails_clearly_and_keeps_the_release(run_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "rel"
    assert main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "lab/x"]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file()


def test_push_names_a_bad_repo_id(run_dir: Path, tmp_path: Path, hub: MockHub, capsys) -> None:
    assert main(["export", str(run_dir), "--out", str(tmp_path / "rel"), "--push-to-hub", "no-org"]) == 1
    assert "expected ORG/NAME" in capsys.readouterr().err
    assert hub.calls == [] and not (tmp_path / "rel").exists()  # refused before the release is written
