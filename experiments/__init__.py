"""Experiment scripts that produce the tables in ``experiments/results/``; run from the repository
root as ``python -m experiments.<name>`` (shared pieces: ``experiments.common``)."""
