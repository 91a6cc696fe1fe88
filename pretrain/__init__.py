"""Self-supervised pretraining of timm backbones: ``medfm pretrain --config FILE [key=value ...]``.

config.py (the one schema, ``derive``) -> data.py (spec -> seeded, resumable batches of views) ->
methods/ (MAE, DINO, SimCLR, MoCo v3 behind one ``SSLMethod`` interface, registry ``METHODS``) ->
engine.py (the loop) <- main.py (wiring), checkpoint.py (atomic save / automatic resume), monitor.py and
knn.py (what a run reports). Imports go one way: data_shards <- pretrain <- downstream.
"""
