"""The robustness index (de Jong, Marcus and Teuwen 2025, "Current pathology foundation models are unrobust to
medical center differences"): does a backbone's embedding group images by biology or by the site they come from?

For each embedding, its k nearest neighbours (cosine, itself excluded) are counted by class and site:
``SO`` neighbours of the same class from another site, ``OS`` of another class from the same site. The index is
``RI_k = sum SO / sum OS`` over all embeddings: above 1, biology dominates the site signature; below 1, a
neighbour is more often a different diagnosis from the same scanner than the same diagnosis from another one.
The paper's control is reported too: how well the site itself is predicted by a leave-one-out kNN vote (against
the share of the largest site), beside the class.

The site of each sample comes from a ``sites.source`` (see :func:`sample_sites`): a CSV's ``site`` column, a folder
level of the sample's path, a shard-set metadata field (DICOM ``manufacturer`` / ``manufacturer_model``), or a CSV
file of ``key,site`` rows.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medfm.data_shards.errors import ConfigError, InputError
from medfm.data_shards.images import csv_rows
from medfm.data_shards.specs import parse_spec
from medfm.data_shards.stream import open_shard_set, read_shard, sample_record

SOURCE_FORMS = "csv (the site column of a csv: spec), level:N, meta:FIELD or file:SITES.csv"
_SHOWN = 5
_CHUNK = 4096  # query rows per similarity block: (4096 x N) floats at a time, flat memory on large sets


def sample_sites(source: str, spec: str, keys: Sequence[str]) -> list[str]:
    """The site of each sample key of ``spec``, read as ``source`` says:

    - ``csv``: the ``site`` column of the ``csv:FILE`` spec (keys are the rows' paths relative to the CSV).
    - ``level:N``: the N-th folder (0 = first) of the sample's path relative to the dataset root, e.g. level 2 of
      ``train/benign/hospital_a/x.png``; for a shard set, of the path in its ``source`` metadata.
    - ``meta:FIELD``: a metadata field of a ``shards:DIR`` sample, e.g. ``meta:manufacturer``.
    - ``file:SITES.csv``: a CSV with ``key`` and ``site`` columns (keys as in the results: a MedMNIST sample is
      ``test-000012``, an image its path relative to the dataset root).

    Raises ConfigError for an unknown form or a form the spec cannot answer, InputError naming the samples that
    have no site.
    """
    kind, _, argument = source.partition(":")
    parsed = parse_spec(spec)
    if kind == "csv":
        if parsed.kind != "csv":
            raise ConfigError(f"config key 'sites.source': 'csv' reads the site column of a csv: spec, not {spec!r}")
        table = {row.unit.source: row.site for row in csv_rows(parsed.path) if row.site is not None}
        if not table:
            raise ConfigError(f"config key 'sites.source': {parsed.path} has no 'site' column (or it is empty)")
    elif kind == "level":
        if not argument.isdigit():
            raise ConfigError(f"config key 'sites.source': level:N needs a folder index N >= 0, got {source!r}")
        paths = _shard_field(parsed.path, "source", keys) if parsed.kind == "shards" else {k: k for k in keys}
        table = {key: _folder(path, int(argument)) for key, path in paths.items()}
    elif kind == "meta":
        if parsed.kind != "shards" or not argument:
            raise ConfigError(
                f"config key 'sites.source': meta:FIELD reads shard metadata (a shards: spec), got {source!r} for {spec!r}"
            )
        table = _shard_field(parsed.path, argument, keys)
    elif kind == "file":
        table = _site_file(Path(argument))
    else:
        raise ConfigError(f"config key 'sites.source': unknown form {source!r}; expected {SOURCE_FORMS}")
    missing = [key for key in keys if table.get(key) in (None, "")]
    if missing:
        more = f" (and {len(missing) - _SHOWN} more)" if len(missing) > _SHOWN else ""
        raise InputError(
            f"sites.source {source!r}: {len(missing)} sample(s) of {spec} have no site{more}: {', '.join(missing[:_SHOWN])}"
        )
    return [str(table[key]) for key in keys]


def _folder(path: str, level: int) -> str | None:
    folders = Path(path).parts[:-1]
    return folders[level] if level < len(folders) else None


def _shard_field(location: str | Path, field: str, keys: Sequence[str]) -> dict[str, Any]:
    """key -> the metadata ``field`` of each sample of a shard set (one pass over the json records)."""
    urls, manifest = open_shard_set(str(location))
    wanted, found = set(keys), {}
    for url, entry in zip(urls, manifest.shards, strict=True):
        for raw in read_shard(url, entry, whole=False):
            if raw["__key__"] in wanted:
                found[raw["__key__"]] = sample_record(raw, url).get(field)
    return found


def _site_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ConfigError(f"config key 'sites.source': no such file {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        rows = [{(name or "").strip().lower(): (value or "").strip() for name, value in row.items()} for row in reader]
        if not {"key", "site"} <= {(name or "").strip().lower() for name in reader.fieldnames or []}:
            raise InputError(f"{path}: needs the columns 'key' and 'site', has {reader.fieldnames}")
    return {row["key"]: row["site"] for row in rows}


def neighbours(features: Tensor, k: int) -> Tensor:
    """(N, k) indices of each row's k nearest other rows by cosine similarity, nearest first. features: (N, D)."""
    normed = torch.nn.functional.normalize(features.float(), dim=1)
    rows = []
    for start in range(0, len(normed), _CHUNK):
        similarity = normed[start : start + _CHUNK] @ normed.T
        own = torch.arange(start, start + len(similarity))
        similarity[torch.arange(len(similarity)), own] = -float("inf")  # never its own neighbour
        rows.append(similarity.topk(k, dim=1).indices)
    return torch.cat(rows)


def robustness_index(features: Tensor, labels: Tensor, sites: Sequence[str], ks: Sequence[int]) -> dict[str, Any]:
    """The robustness index at each k (clipped to N - 1) with its counts and the kNN controls.

    features (N, D); labels (N,) int (single-label); sites: N names. Returns ``{"n", "sites": {site: n},
    "rows": [{"k", "robustness_index", "same_class_other_site", "other_class_same_site", "site_knn_acc",
    "class_knn_acc"}], "site_majority_share"}``; the index is None where no neighbour is of another class from
    the same site (nothing to divide by).
    """
    if labels.ndim != 1:
        raise ConfigError("protocol robustness_index: needs single-label data (one class per image)")
    site_names = sorted(set(sites))
    if len(site_names) < 2:
        raise InputError(
            f"protocol robustness_index: the data has {len(site_names)} site(s) ({', '.join(site_names)}); the index compares sites, it needs 2 or more"
        )
    site = torch.tensor([site_names.index(s) for s in sites])
    k_max = min(max(ks), len(features) - 1)
    order = neighbours(features, k_max)
    same_class = labels[order] == labels[:, None]  # (N, k_max)
    same_site = site[order] == site[:, None]
    rows = []
    for k in sorted({min(k, k_max) for k in ks}):
        so = int((same_class[:, :k] & ~same_site[:, :k]).sum())
        os_ = int((~same_class[:, :k] & same_site[:, :k]).sum())
        rows.append(
            {
                "k": k,
                "robustness_index": so / os_ if os_ else None,
                "same_class_other_site": so,
                "other_class_same_site": os_,
                "site_knn_acc": _vote_accuracy(site, order[:, :k]),
                "class_knn_acc": _vote_accuracy(labels, order[:, :k]),
            }
        )
    counts = Counter(sites)
    return {
        "n": len(features),
        "sites": dict(sorted(counts.items())),
        "site_majority_share": max(counts.values()) / len(sites),
        "rows": rows,
    }


def _vote_accuracy(values: Tensor, order: Tensor) -> float:
    """Leave-one-out accuracy of a majority vote of each row's neighbours (ties: the smallest value)."""
    votes = torch.nn.functional.one_hot(values[order], int(values.max()) + 1).sum(dim=1)
    return float((votes.argmax(dim=1) == values).float().mean())


def per_site_rows(
    sites: Sequence[str], y_true: np.ndarray, scores: np.ndarray, metrics_of: Any
) -> list[dict[str, Any]]:
    """``[{"site", "n", **metrics}]`` of the test predictions of each site; ``metrics_of(y_true, scores)`` gives
    the metrics (the evaluation's own, so that a site's row reads like the whole test row)."""
    names = np.asarray(sites)
    return [
        {"site": site, "n": int((names == site).sum()), **metrics_of(y_true[names == site], scores[names == site])}
        for site in sorted(set(sites))
    ]
