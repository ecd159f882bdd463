"""The real-data ViT merging benchmark (``python -m experiments.merging.run``), the ScaLearn transfer
experiment on it (``python -m experiments.merging.scalearn``) and the side-by-side table of runs
(``python -m experiments.merging.compare``)."""
