"""Streaming reader: decoding, labels, 16-bit precision, exact splits, resampling without hangs, flat memory."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

from medfm.cli import main
from medfm.data_shards.specs import parse_spec
from medfm.data_shards.stream import ShardStream


def write_images(folder: Path, count: int, size: int = 32, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"img{i:04d}.png")


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """23 random 32 px images in 3 shards of 10, 10 and 3 samples."""
    root = tmp_path_factory.mktemp("uneven")
    write_images(root / "images", 23)
    out = root / "shards"
    assert main(["shard", str(root / "images"), "--out", str(out), "--max-count", "10", "--workers", "1"]) == 0
    return out


def test_samples_decode_to_float_tensors_with_labels(shared_data: Path, tmp_path: Path):
    out = tmp_path / "breast"
    npz = shared_data / "medmnist" / "breastmnist.npz"
    assert main(["shard", f"medmnist:{npz}", "--out", str(out), "--workers", "1", "--dedup", "none"]) == 0
    stream = ShardStream(out, resampled=False, shuffle_buffer=1, split="train")
    samples = list(stream)
    assert len(samples) == 546
    first = samples[0]
    assert first["image"].dtype == torch.float32 and first["image"].shape == (1, 28, 28)
    assert first["image"].min() >= 0.0 and first["image"].max() <= 1.0
    with np.load(npz) as archive:
        labels, images = archive["train_labels"][:, 0], archive["train_images"]
    assert [s["label"] for s in samples] == labels.tolist()  # one pass, no shuffle: source order
    assert torch.allclose(first["image"][0], torch.from_numpy(images[0]).float() / 255)
    assert parse_spec(f"shards:{out}").kind == "shards"


@pytest.mark.parametrize("codec", ["npy", "png"])
def test_sixteen_bit_precision_survives_sharding(tmp_path: Path, codec: str):
    gradient = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    (tmp_path / "in").mkdir()
    Image.fromarray(gradient).save(tmp_path / "in" / "gradient16.png")
    out = tmp_path / "out"
    assert main(["shard", str(tmp_path / "in"), "--out", str(out), "--workers", "1", "--codec", codec]) == 0
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert any(name.endswith(f".{codec}") for name in tar.getnames())
    image = next(iter(ShardStream(out, resampled=False)))["image"][0]
    levels = torch.round(image * 65535).to(torch.int64)
    assert levels.unique().numel() == 64 * 64  # far more than the 256 levels of 8 bits
    expected = (gradient.astype(np.float64) - gradient.min()) / (gradient.max() - gradient.min())
    assert np.abs(image.numpy() - expected).max() < 1e-4


def test_one_pass_splits_ranks_and_workers_without_overlap(uneven_shards: Path):
    keys = []
    for rank in range(2):
        stream = ShardStream(uneven_shards, resampled=False, rank=rank, world_size=2, shuffle_buffer=1)
        loader = DataLoader(stream, batch_size=4, num_workers=2)
        keys += [k for batch in loader for k in batch["key"]]
    assert len(keys) == len(set(keys)) == 23


def test_resampled_epochs_have_fixed_length_and_are_seeded(uneven_shards: Path):
    def epoch_keys(epoch: int, seed: int = 0) -> list[str]:
        stream = ShardStream(uneven_shards, samples_per_epoch=40, seed=seed, shuffle_buffer=8)
        stream.set_epoch(epoch)
        return [k for batch in DataLoader(stream, batch_size=8, num_workers=2) for k in batch["key"]]

    first = epoch_keys(0)
    assert len(first) == 40 and len(DataLoader(ShardStream(uneven_shards, samples_per_epoch=40), batch_size=8)) == 5
    assert epoch_keys(0) == first
    assert epoch_keys(1) != first and epoch_keys(0, seed=1) != first


def test_channels_are_matched(uneven_shards: Path):
    image = next(iter(ShardStream(uneven_shards, channels=3, resampled=False)))["image"]
    assert image.shape[0] == 3 and torch.equal(image[0], image[2])


def test_memory_stays_flat_as_the_stream_grows(uneven_shards: Path):
    def peak_bytes(samples: int) -> int:
        stream = ShardStream(uneven_shards, samples_per_epoch=samples, shuffle_buffer=16)
        tracemalloc.start()
        for _ in stream:
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, large = peak_bytes(200), peak_bytes(2000)
    assert large < 1.5 * small + 200_000, (small, large)


def _rank_main(rank: int, world: int, shard_dir: str, store: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    assert dist.get_world_size() == 2
    # 2 ranks x 2 workers = 4 readers over 3 unequal shards: an even split is impossible.
    stream = ShardStream(shard_dir, samples_per_epoch=30, shuffle_buffer=4, seed=7)
    batches = 0
    keys = []
    for batch in DataLoader(stream, batch_size=4, num_workers=2):
        total = torch.tensor([batch["image"].shape[0]], dtype=torch.float32)
        dist.all_reduce(total)  # hangs if one rank runs out of batches before the other
        batches += 1
        keys += batch["key"]
    dist.barrier()
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps({"batches": batches, "keys": keys}))
    dist.destroy_process_group()


def test_two_processes_with_more_readers_than_shards_do_not_hang(uneven_shards: Path, tmp_path: Path):
    context = mp.start_processes(
        _rank_main,
        args=(2, str(uneven_shards), str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.time() + 120
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("2-process streaming hung (ranks saw different numbers of batches)")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["batches"] == results[1]["batches"] == 8  # ceil(30 / 4)
    assert len(results[0]["keys"]) == len(results[1]["keys"]) == 30
    assert results[0]["keys"] != results[1]["keys"]  # ranks draw their own streams
    assert os.environ.get("WORLD_SIZE") is None


@pytest.fixture
def png_shards(medmnist, tmp_path: Path) -> Path:
    from medfm.cli import main

    out = tmp_path / "png"
    args = ["shard", f"medmnist:{medmnist('breastmnist')}", "--out", str(out), "--codec", "png", "--max-count", "300"]
    assert main([*args, "--workers", "1"]) == 0
    return out


def _keys(dataset) -> list[str]:
    return sorted(sample["key"] for sample in dataset)


def test_remote_shards_read_like_a_folder_brace_pipe_and_http(png_shards: Path):
    import http.server
    import threading
    from functools import partial

    from medfm.data_shards.specs import open_dataset

    names = sorted(p.name for p in png_shards.glob("shard-*.tar"))
    pattern = f"shard-{{000000..{len(names) - 1:06d}}}.tar"
    local = _keys(open_dataset(f"shards:{png_shards}", resampled=False, shuffle_buffer=0))
    assert len(local) == 779  # BreastMNIST holds one exact duplicate
    assert _keys(open_dataset(f"shards:{png_shards}/{pattern}", resampled=False, shuffle_buffer=0)) == local
    assert _keys(open_dataset(f"shards:pipe:cat {png_shards}/{pattern}", resampled=False, shuffle_buffer=0)) == local
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(png_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        if shutil.which("curl") is None:
            pytest.skip("curl not installed: webdataset reads http(s) shards through curl")
        assert _keys(open_dataset(f"shards:{url}/{pattern}", resampled=False, shuffle_buffer=0)) == local
        assert _keys(open_dataset(f"shards:{url}/", resampled=False, shuffle_buffer=0)) == local  # a folder URL
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="the manifest lists"):
        open_dataset(f"shards:{png_shards}/shard-{{000000..000000}}.tar", resampled=False)


def test_png_shards_open_with_plain_webdataset_and_timm(png_shards: Path):
    import timm
    import timm.data
    import webdataset as wds
    from packaging.version import Version

    if Version(timm.__version__) < Version("1.0.31"):
        pytest.skip(f"timm {timm.__version__}: its wds reader takes labels from a .cls member only (json from 1.0.31)")

    count = len(list(png_shards.glob("shard-*.tar")))
    pattern = f"shard-{{000000..{count - 1:06d}}}.tar"
    samples = list(wds.WebDataset(str(png_shards / pattern), shardshuffle=False).decode("pil").to_tuple("png", "json"))
    assert len(samples) == 779 and samples[0][0].size == (28, 28) and "label" in samples[0][1]
    dataset = timm.data.create_dataset(
        "wds/breastmnist", root=str(png_shards), split=f"{pattern}|779", target_key="label", input_img_mode="L"
    )
    image, target = next(iter(dataset))
    assert image.size == (28, 28) and int(target) in (0, 1)


def test_the_manifest_is_found_beside_any_shard_pattern():
    from medfm.data_shards.stream import beside, is_remote

    assert beside("https://h/set/shard-{000000..000009}.tar", "manifest.json") == "https://h/set/manifest.json"
    assert beside("https://h/set/", "manifest.json") == "https://h/set/manifest.json"
    assert (
        beside("pipe:aws s3 cp s3://b/set/shard-{000000..000009}.tar -", "manifest.json")
        == "pipe:aws s3 cp s3://b/set/manifest.json -"
    )
    assert is_remote("pipe:cat x") and is_remote("/data/shard-{0..3}.tar") and not is_remote("/data/shards")
