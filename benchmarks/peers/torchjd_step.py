"""PyTorch peer of ``python -m benchmarks.method_step_time``: TorchJD (and a cvxpy Nash-MTL) train steps.

Runs in the separate peers venv (``.peers-venv``: torch==2.13.0 CPU, ``torchjd[full]``, cvxpy)::

    .peers-venv/bin/python benchmarks/peers/torchjd_step.py --tasks 10 --impls upgrad,mgda,nash_mtl_cvxpy

prints ``{impl: median ms per step}`` as JSON (``--device cuda``: on the GPU, synchronised around each
timed run; the ``setup`` command takes ``device`` too). ``method_step_time.py`` starts it with ``--serve``
instead and drives it with one JSON command per line on stdin (``setup``, ``time``, ``quit``), so
that its rounds alternate with the JAX steps of the same run; each reply is one JSON line.

The model is the one mtl_jax builds for that benchmark: trunk 784-512-512 (Linear + ReLU), one
Linear(512, 10) head per task, cross-entropy per task, ``torch.optim.Adam(lr=1e-3)`` over every
parameter. One step = forward, backward as the implementation prescribes, optimiser step.

Implementations (the keys are mtl_jax method names where there is a counterpart):

* TorchJD aggregators, used as its docs show: ``autojac.mtl_backward(losses, features=features)``
  then ``autojac.jac_to_grad(trunk.parameters(), aggregator)`` (heads get their own gradients from
  ``mtl_backward``). SDMGrad and MoDo exist only as weightings; they are wrapped in a
  ``GramianWeightedAggregator``, i.e. fed the single-batch Gramian (mtl_jax's default is the
  papers' double sampling, the cross Gramian of two half-batches: a little more work).
* TorchJD scalarizers (loss weighting): ``scalarizer(stack(losses)).backward()``. FAMO's logit
  update follows the official code, as mtl_jax's default does: after the optimiser step a no-grad
  forward on the same batch gives ``L_t(theta_{t+1})`` for ``FAMO.update``.
* ``torch_sum``: the plain summed-loss step (no TorchJD), the PyTorch floor of a loss-weighting step.
* ``jd_mean``: TorchJD's Jacobian path with the ``Mean`` aggregator (EW through ``mtl_backward``).
* ``nash_mtl_cvxpy``: Nash-MTL as in the authors' code (AvivNavon/nash-mtl,
  ``methods/weight_methods.py``): per-task shared gradients by ``autograd.grad`` per task, Gramian
  normalised by its Frobenius norm, the concave-convex sequence of ECOS solves through cvxpy
  (``optim_niter=20``, warm start, ``max_iters=100``, same stop rules), weighted-loss backward,
  ``clip_grad_norm_(shared, max_norm=1)``, optimiser step.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchjd import aggregation as A
from torchjd import scalarization as S
from torchjd.autojac import jac_to_grad, mtl_backward

from serve import build_runners, median_ms, parse_peer_args, peer_parser, serve

HIDDEN = (512, 512)
NUM_CLASSES = 10
LR = 1e-3

# mtl_jax method name -> (kind, factory(num_tasks) -> TorchJD object, TorchJD name)
AGGREGATORS = {
    "jd_mean": lambda k: A.Mean(),
    "mgda": lambda k: A.MGDA(),
    "pcgrad": lambda k: A.PCGrad(),
    "gradvac": lambda k: A.GradVac(beta=0.5),
    "cagrad": lambda k: A.CAGrad(c=0.5),
    "nash_mtl": lambda k: A.NashMTL(n_tasks=k, max_norm=1.0, update_weights_every=1, optim_niter=20),
    "imtl_g": lambda k: A.IMTLG(),
    "aligned_mtl": lambda k: A.AlignedMTL(),
    "upgrad": lambda k: A.UPGrad(),
    "dualproj": lambda k: A.DualProj(),
    "fairgrad": lambda k: A.FairGrad(alpha=1.0),
    "config": lambda k: A.ConFIG(),
    "sdmgrad": lambda k: A.GramianWeightedAggregator(A.SDMGradWeighting(lambda_=0.3)),
    "modo": lambda k: A.GramianWeightedAggregator(A.MoDoWeighting()),
    "excess_mtl": lambda k: A.ExcessMTL(),
    "graddrop": lambda k: A.GradDrop(),
}
SCALARIZERS = {
    "torch_sum": lambda k: None,
    "ew": lambda k: S.Sum(),
    "uw": lambda k: S.UW(k),
    "dwa": lambda k: S.DWA(temperature=2.0),
    "rlw": lambda k: S.Random(),
    "gls": lambda k: S.GeometricMean(),
    "imtl_l": lambda k: S.IMTLL(k),
    "famo": lambda k: S.FAMO(k),
    "stch": lambda k: S.STCH(mu=1.0),
}
TORCHJD_NAMES = {
    "jd_mean": "Mean (mtl_backward)", "mgda": "MGDA", "pcgrad": "PCGrad", "gradvac": "GradVac",
    "cagrad": "CAGrad", "nash_mtl": "NashMTL", "imtl_g": "IMTLG", "aligned_mtl": "AlignedMTL",
    "upgrad": "UPGrad", "dualproj": "DualProj", "fairgrad": "FairGrad", "config": "ConFIG",
    "sdmgrad": "SDMGradWeighting", "modo": "MoDoWeighting", "excess_mtl": "ExcessMTL", "graddrop": "GradDrop",
    "torch_sum": "(plain torch sum)", "ew": "scalarization.Sum", "uw": "scalarization.UW",
    "dwa": "scalarization.DWA", "rlw": "scalarization.Random", "gls": "scalarization.GeometricMean",
    "imtl_l": "scalarization.IMTLL", "famo": "scalarization.FAMO", "stch": "scalarization.STCH",
    "nash_mtl_cvxpy": "Nash-MTL original (cvxpy/ECOS per step)",
}
IMPLS = list(SCALARIZERS) + list(AGGREGATORS) + ["nash_mtl_cvxpy"]


class HPS(nn.Module):
    """784-512-512 ReLU trunk + K linear heads: the model mtl_jax's ``hps`` config builds."""

    def __init__(self, in_features: int, num_tasks: int):
        super().__init__()
        layers, width = [], in_features
        for h in HIDDEN:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, NUM_CLASSES) for _ in range(num_tasks))

    def losses(self, x, y):
        features = self.trunk(x)
        return features, [F.cross_entropy(head(features), y[:, k]) for k, head in enumerate(self.heads)]


class CvxpyNashMTL:
    """The authors' Nash-MTL weight solver: CCP over ECOS solves of a cvxpy problem, per step."""

    def __init__(self, num_tasks: int, optim_niter: int = 20):
        import cvxpy as cp

        self.cp = cp
        self.num_tasks = num_tasks
        self.optim_niter = optim_niter
        self.prvs_alpha = np.ones(num_tasks, dtype=np.float32)
        self.normalization_factor = np.ones((1,))
        self.alpha = cp.Variable(shape=(num_tasks,), nonneg=True)
        self.prvs_alpha_param = cp.Parameter(shape=(num_tasks,), value=self.prvs_alpha)
        self.gtg = cp.Parameter(shape=(num_tasks, num_tasks), value=np.eye(num_tasks))
        self.norm_param = cp.Parameter(shape=(1,), value=np.array([1.0]))
        g_prev = self.gtg @ self.prvs_alpha_param
        phi_grad = 1 / self.prvs_alpha_param + (1 / g_prev) @ self.gtg
        phi_alpha = phi_grad @ (self.alpha - self.prvs_alpha_param)
        g_alpha = self.gtg @ self.alpha
        constraints = [-cp.log(self.alpha[i] * self.norm_param) - cp.log(g_alpha[i]) <= 0 for i in range(num_tasks)]
        self.problem = cp.Problem(cp.Minimize(cp.sum(g_alpha) + phi_alpha / self.norm_param), constraints)

    def _stop(self, gtg, alpha_t) -> bool:
        return bool(self.alpha.value is None
                    or np.linalg.norm(gtg @ alpha_t - 1 / (alpha_t + 1e-10)) < 1e-3
                    or np.linalg.norm(self.alpha.value - self.prvs_alpha_param.value) < 1e-6)

    def weights(self, grads: torch.Tensor) -> np.ndarray:
        gtg = grads @ grads.T
        self.normalization_factor = torch.norm(gtg).detach().cpu().numpy().reshape((1,))
        gtg = (gtg / self.normalization_factor.item()).cpu().numpy()
        self.gtg.value = gtg
        self.norm_param.value = self.normalization_factor
        alpha_t = self.prvs_alpha
        for _ in range(self.optim_niter):
            self.alpha.value = alpha_t
            self.prvs_alpha_param.value = alpha_t
            try:
                self.problem.solve(solver=self.cp.ECOS, warm_start=True, max_iters=100)
            except (self.cp.error.SolverError, ValueError):
                self.alpha.value = self.prvs_alpha_param.value
            if self._stop(gtg, alpha_t):
                break
            alpha_t = self.alpha.value
        if alpha_t is not None:
            self.prvs_alpha = alpha_t
        return self.prvs_alpha


class Runner:
    """One implementation's model, optimiser and step on a fixed batch."""

    def __init__(self, impl: str, x: torch.Tensor, y: torch.Tensor, seed: int, device: str = "cpu"):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.impl, self.x, self.y = impl, x.to(self.device), y.to(self.device)
        num_tasks = y.shape[1]
        self.model = HPS(x.shape[1], num_tasks).to(self.device)
        params = list(self.model.parameters())
        self.scalarizer = self.aggregator = self.nash = None
        if impl in SCALARIZERS:
            self.scalarizer = SCALARIZERS[impl](num_tasks)
            if isinstance(self.scalarizer, nn.Module):
                self.scalarizer.to(self.device)
            if impl in ("uw", "imtl_l"):  # their log-variances / log-scales train with the model
                params += list(self.scalarizer.parameters())
        elif impl in AGGREGATORS:
            self.aggregator = AGGREGATORS[impl](num_tasks)
        elif impl == "nash_mtl_cvxpy":
            self.nash = CvxpyNashMTL(num_tasks)
        else:
            raise ValueError(f"unknown implementation {impl!r}; valid: {IMPLS}")
        self.optimizer = torch.optim.Adam(params, lr=LR)
        self.steps = 0

    def step(self) -> None:
        features, losses = self.model.losses(self.x, self.y)
        if self.aggregator is not None:
            mtl_backward(losses, features=features)
            jac_to_grad(self.model.trunk.parameters(), self.aggregator)
        elif self.nash is not None:
            shared = list(self.model.trunk.parameters())
            grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                                 for loss in losses])
            alpha = torch.from_numpy(self.nash.weights(grads)).to(self.device)
            sum(loss * alpha[i] for i, loss in enumerate(losses)).backward()
            torch.nn.utils.clip_grad_norm_(shared, 1.0)
        elif self.scalarizer is None:
            torch.stack(losses).sum().backward()
        else:
            stacked = torch.stack(losses)
            self.scalarizer(stacked).backward()
            if self.impl == "dwa":
                self.scalarizer.step()  # mtl_jax's default steps_per_epoch=1: new weights every step
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.impl == "famo":  # FAMO's official loop: a no-grad forward at theta_{t+1}, then the logit update
            with torch.no_grad():
                self.scalarizer.update(torch.stack(self.model.losses(self.x, self.y)[1]))
        self.steps += 1

    def time(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps (the device synchronised before and after)."""
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return (time.perf_counter() - start) / steps

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def load_batch(path: str | None, num_tasks: int, batch_size: int, seed: int):
    if path:
        data = np.load(path)
        x, y = data["x"], data["y"]
    else:
        rng = np.random.default_rng(seed)
        x = rng.random((batch_size, 784), dtype=np.float32)
        y = rng.integers(0, NUM_CLASSES, (batch_size, num_tasks))
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))


def setup(impls, x, y, seed: int, warmup: int, device: str = "cpu"):
    """``(runners, skipped)``: a warmed-up Runner per implementation on ``device``."""
    return build_runners(impls, lambda impl: Runner(impl, x, y, seed, device), warmup)


def handlers() -> dict:
    """The ``setup`` and ``time`` commands of ``serve``, sharing the runners built by ``setup``."""
    runners: dict[str, Runner] = {}

    def on_setup(cmd: dict) -> dict:
        nonlocal runners
        x, y = load_batch(cmd.get("batch"), cmd["num_tasks"], 256, cmd.get("seed", 0))
        device = cmd.get("device", "cpu")
        runners, skipped = setup(cmd["impls"], x, y, cmd.get("seed", 0), cmd.get("warmup", 2), device)
        return {"ok": True, "impls": list(runners), "skipped": skipped, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "device": device,
                "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"}

    def on_time(cmd: dict) -> dict:
        return {"impl": cmd["impl"], "sec_per_step": runners[cmd["impl"]].time(cmd["steps"])}

    return {"setup": on_setup, "time": on_time}


def main():
    parser = peer_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", default=None, help=".npz with x [B, 784] float32 and y [B, K] int")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:0, ...")
    args = parse_peer_args(parser)
    if args.serve:
        serve(handlers())
        return
    x, y = load_batch(args.batch, args.tasks, 256, args.seed)
    runners, skipped = setup(args.impls.split(","), x, y, args.seed, 2, args.device)
    print(json.dumps({"num_tasks": args.tasks, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "ms": median_ms(runners, args.rounds, args.steps), "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
