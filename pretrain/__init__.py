"""Self-supervised pretraining of timm backbones: ``medfm pretrain --config FILE [key=value ...]``.

The run contract, one module per concern:
- ``errors``: every failure a command can end with and the one map to exit codes (``run_command``).
- ``config``: the one schema (each method adds its own section, declared beside it), ``derive`` (through
  ``schedules.derive_steps``, shared with fine-tuning); ``data``: spec -> seeded, resumable batches of views.
- ``methods/``: one file per objective (MAE, DINO, DINOv2, SimCLR, MoCo v3, distillation, SparK) behind ``SSLMethod``,
  registry ``METHODS``.
- ``engine``: ``train_step`` (one optimizer step, also used by fine-tuning) and pretraining's loop ``train``.
- ``backends/``: the one interface behind which plain / DDP and DeepSpeed runs differ (preparation and precision
  casts, autocast for the step and for every other forward, EMA gathering, the checkpoint store, the release);
  DeepSpeed is imported there only. ``checkpoint``: the checkpoint contract and its torch-file store;
  ``distributed``: the one Accelerator builder, process groups, failure detection; ``supervise``: ``medfm
  pretrain`` under a multi-process GPU launch (an NCCL watchdog abort becomes exit 3).
- ``release/``: the release folder (``format``: write, read, one key checker; ``results``: results files; ``card``:
  the model card from ``card.md``); ``runs``: a run's method rebuilt from its checkpoint; ``export``:
  ``medfm export``; ``main``: wiring; ``monitor`` / ``knn``: what a run reports.
Imports go one way: data_shards <- pretrain <- downstream, with no circle inside a package (tests/test_imports.py).
"""
