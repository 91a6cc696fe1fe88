"""Downstream evaluation of pretrained backbones: load releases strictly, frozen-feature protocols (kNN, linear
probe), fine-tuning, metrics and reports. Imports go one way: ``data_shards`` <- ``pretrain`` <- ``downstream``.

- ``load``: a release (read and key-checked by ``medfm.pretrain.release``) -> a timm model for a task.
- ``data``: labeled train / val / test splits of a dataset spec, the task they define, the eval transform.
- ``features`` / ``linear``: cached frozen features and the weighted kNN on them (the rule is pretraining's
  ``medfm.pretrain.knn``), logistic-regression probe.
- ``finetune_run``: one fine-tuning run with layer-wise lr decay, best-on-val, on pretraining's ``train_step`` and
  checkpoint store (a killed run resumes); ``finetune``: the grid (inits, label budgets x seeds, corrupted test).
- ``metrics`` / ``report``: MedMNIST-convention metrics; JSON (with ``results_summary.json`` for the model card),
  Markdown (the one summary table) and PNG reports.
- ``efficiency`` / ``robustness`` / ``sites``: the one label-budget loop over seeds; the one corrupted-test loop;
  the robustness index (site / scanner confounding).
- ``reduce``: ``medfm shard reduce`` (a diverse subset of a shard set by a backbone's embeddings).
- ``evaluate`` / ``cli`` / ``config``: ``medfm eval``, ``medfm finetune``, ``medfm export``.

The tools that drive the whole chain (``medfm bench quality``, ``medfm demo``, the config reference) live one floor
up, in the ``medfm`` package.
"""
