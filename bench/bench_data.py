"""Benchmark of the data layer: shard writer images/s, and shard reader vs per-file DICOM images/s per core.

Reader: decode + a two-view augmentation (random resized crop + flip, twice) at 224 px and at 64 px, in one
process with one torch thread, so the figure is images/s per core. The per-file baseline reads the same
real DICOM images with the same reader code (modality LUT, windowing, resize) and the same augmentation.

    python bench/bench_data.py                     # uses ../shared/data
    python bench/bench_data.py --samples 4000 --json bench/results/data.json
    python bench/bench_data.py --multicrop dino_vit_s16_224.yaml   # a recipe's own views from shards, per core

``--multicrop RECIPE`` only measures the data path of a pretraining recipe of ``configs/pretrain/`` (DINO: 2 global
224 px + N local 96 px crops with its augmentation) on shards of the embedded sample images stored at 256 px.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

from medfm.cli import main as medfm
from medfm.data_shards.codec import match_channels, pixels_to_tensor
from medfm.data_shards.dicom import DicomFile
from medfm.data_shards.manifest import Manifest
from medfm.data_shards.records import ReadOptions
from medfm.data_shards.stream import ShardStream

REPO = Path(__file__).resolve().parents[1]


class TwoViews:
    """Two independent random-resized-crop + flip views of one (C, H, W) float image."""

    def __init__(self, size: int):
        self.augment = v2.Compose(
            [v2.RandomResizedCrop(size, scale=(0.4, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(image), self.augment(image)


def dicom_corpus(data: Path) -> list[Path]:
    """Real single-frame DICOM: the 32-slice 512 px MR series, 512 px CTs, a 1024 px chest X-ray and MR."""
    series = sorted((data / "dicom" / "series" / "vs_seg_001_t1_mprage").glob("*.dcm"))
    singles = [
        "covid19_ny_sbu_A002304_axial_19001231-076.dcm",
        "covid19_ny_sbu_A027284_axial_19000925-116.dcm",
        "CT_small.dcm",
        "nih_chestxray14_DX_nofinding.dcm",
        "MR2_UNCR.dcm",
        "MR_small.dcm",
    ]
    return series + [data / "dicom" / "single" / name for name in singles]


def compress_j2k(files: list[Path], folder: Path) -> list[Path]:
    """Lossless JPEG 2000 copies of ``files``: the transfer syntax of many PACS exports."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    folder.mkdir()
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(folder / path.name)
        out.append(folder / path.name)
    return out


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def shard_rate(sources: list[str], out: Path, workers: int, extra: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    code = medfm(["shard", *sources, "--out", str(out), "--workers", str(workers), "--overwrite", *extra])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"medfm shard failed on {sources}")
    samples = Manifest.read(out).totals["samples"]
    return rate(samples, seconds), samples


def reader_rate(shard_dir: Path, size: int, samples: int) -> float:
    stream = ShardStream(shard_dir, TwoViews(size), samples_per_epoch=samples, shuffle_buffer=256, channels=1)
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    return rate(count, time.perf_counter() - start)


def dicom_rate(files: list[Path], size: int, max_side: int, samples: int) -> float:
    augment, options = TwoViews(size), ReadOptions(max_side=max_side)
    start = time.perf_counter()
    count = 0
    for path in itertools.islice(itertools.cycle(files), samples):
        for image in DicomFile(path, path.name).read(options):
            augment(match_channels(pixels_to_tensor(image.pixels), 1))
            count += 1
    return rate(count, time.perf_counter() - start)


def multicrop_rate(recipe: str, samples: int) -> dict:
    """Images/s per core of a recipe's own transform (e.g. DINO multi-crop) on shards read from disk."""
    from medfm.pretrain.config import load_config
    from medfm.pretrain.methods import METHODS

    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "pretrain" / recipe, [f"data.spec=shards:{tempfile.gettempdir()}"])
    transform = METHODS[cfg.method].build_transform(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "sample"
        shard_rate(["sample:"], shards, 1, ["--max-side", "256", "--dedup", "none"])
        stream = ShardStream(
            shards, transform, samples_per_epoch=samples, shuffle_buffer=64, channels=cfg.data.in_chans
        )
        start = time.perf_counter()
        views = [len(item["image"]) if isinstance(item["image"], (list, tuple)) else 1 for item in stream]
    speed = rate(len(views), time.perf_counter() - start)
    return {
        "recipe": recipe,
        "method": cfg.method,
        "img_size": cfg.data.img_size,
        "torch_threads": 1,
        "views_per_image": max(views, default=0),
        "img_s_per_core": speed,
    }


def run(data: Path, samples: int, dicom_samples: int) -> dict:
    torch.set_num_threads(1)
    files = dicom_corpus(data)
    results: dict = {"machine": platform.processor() or platform.machine(), "torch_threads": 1, "images": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        corpus = tmp_dir / "dicom"
        for copy in range(4):  # 4 copies (dedup off) so that the writer's pool start-up is amortised
            (corpus / f"copy{copy}").mkdir(parents=True)
            for path in files:
                (corpus / f"copy{copy}" / path.name).symlink_to(path)
        npz = data / "medmnist" / "pneumoniamnist.npz"
        for workers in (1, 2):
            speed, count = shard_rate(
                [str(corpus)], tmp_dir / f"w{workers}", workers, ["--max-side", "256", "--dedup", "none"]
            )
            results[f"writer_dicom_to_256px_workers{workers}_img_s"] = speed
            results["images"]["dicom"] = count
            speed, count = shard_rate([f"medmnist:{npz}"], tmp_dir / f"n{workers}", workers, ["--dedup", "none"])
            results[f"writer_medmnist_28px_workers{workers}_img_s"] = speed
            results["images"]["medmnist"] = count
        shard_rate([str(corpus)], tmp_dir / "s72", 2, ["--max-side", "72"])
        j2k_files = compress_j2k(files, tmp_dir / "j2k")
        for size, shards, max_side in ((224, tmp_dir / "w2", 256), (64, tmp_dir / "s72", 72)):
            shard_speed = reader_rate(shards, size, samples)
            dicom_speed = dicom_rate(files, size, max_side, dicom_samples)
            j2k_speed = dicom_rate(j2k_files, size, max_side, max(dicom_samples // 4, 38))
            results[f"reader_shards_{size}px_img_s_per_core"] = shard_speed
            results[f"reader_dicom_files_{size}px_img_s_per_core"] = dicom_speed
            results[f"reader_dicom_j2k_files_{size}px_img_s_per_core"] = j2k_speed
            results[f"speedup_vs_dicom_{size}px"] = shard_speed / dicom_speed
            results[f"speedup_vs_dicom_j2k_{size}px"] = shard_speed / j2k_speed
        shard_rate([f"medmnist:{data / 'medmnist' / 'breastmnist_64.npz'}"], tmp_dir / "b64", 2, ["--dedup", "none"])
        results["reader_shards_medmnist64_64px_img_s_per_core"] = reader_rate(tmp_dir / "b64", 64, samples)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--samples", type=int, default=3000, help="images read from shards per measurement")
    parser.add_argument("--dicom-samples", type=int, default=300, help="images read per file from DICOM")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--multicrop", metavar="RECIPE", help="only the data path of this configs/pretrain/ recipe")
    args = parser.parse_args()
    if args.multicrop:
        results = multicrop_rate(args.multicrop, args.samples)
    elif not args.data.is_dir():
        raise SystemExit(f"real data folder {args.data} not found (pass --data)")
    else:
        results = run(args.data, args.samples, args.dicom_samples)
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:,.1f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
