"""The release contract: one folder that timm loads like a Hugging Face Hub repo, written and read only here.

- ``format``: the folder (``model.safetensors``, ``config.json``, ``README.md``), its keys checked against timm,
  written whole or not at all, and read back (a release folder, a run directory or a weights file);
- ``card`` + ``card.md``: the model card, a template filled from ``config.json`` and the evaluation results;
- ``results``: the ``results_summary.json`` files that downstream writes and the card lists;
- ``files``: atomic text writes and the folder swap.

A run directory rebuilt from its checkpoint (what a release is written from) is ``medfm.pretrain.runs``.
"""

from medfm.pretrain.errors import ExportError
from medfm.pretrain.release.card import card_data, dataset_name, hub_base_model, model_card, short_source
from medfm.pretrain.release.format import (
    CARD_NAME,
    FORMAT,
    check_out_dir,
    check_release_keys,
    data_summary,
    model_args,
    read_release,
    release_config,
    release_contents,
    write_release,
    write_run_release,
)
from medfm.pretrain.release.results import (
    RESULTS_FORMAT,
    RESULTS_NAME,
    SUMMARY_KEYS,
    find_results,
    read_results,
    write_results_summary,
)
from medfm.pretrain.runs import RELEASE_DIR
from medfm.pretrain.weights import LoadError, Release, check_keys

__all__ = [
    "CARD_NAME",
    "FORMAT",
    "RELEASE_DIR",
    "RESULTS_FORMAT",
    "RESULTS_NAME",
    "SUMMARY_KEYS",
    "ExportError",
    "LoadError",
    "Release",
    "card_data",
    "check_keys",
    "check_out_dir",
    "check_release_keys",
    "data_summary",
    "dataset_name",
    "find_results",
    "hub_base_model",
    "model_args",
    "model_card",
    "read_release",
    "read_results",
    "release_config",
    "release_contents",
    "short_source",
    "write_release",
    "write_results_summary",
    "write_run_release",
]
