"""Downstream evaluation of pretrained backbones: load releases strictly, frozen-feature protocols (kNN, linear
probe), fine-tuning, metrics and reports. Imports go one way: ``data_shards`` <- ``pretrain`` <- ``downstream``.

- ``load``: a release folder, run directory or weights file -> a timm model, every key checked.
- ``data``: labeled train / val / test splits of a dataset spec, the task they define, the eval transform.
- ``features`` / ``knn`` / ``linear``: cached frozen features, DINO-style weighted kNN, logistic-regression probe.
- ``finetune``: full fine-tuning with layer-wise lr decay, best-on-val, random-init baseline.
- ``metrics`` / ``report``: MedMNIST-convention metrics; JSON, Markdown and PNG reports.
- ``efficiency`` / ``robustness``: label budgets over seeds; corrupted test copies.
- ``evaluate`` / ``cli`` / ``config``: ``medfm eval``, ``medfm finetune``, ``medfm export``.
"""
