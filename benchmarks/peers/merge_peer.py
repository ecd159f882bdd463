"""Peer merge driver, run by ``python -m benchmarks.merge_throughput`` in the peers venv (.peers-merge-venv).

``python benchmarks/peers/merge_peer.py {fusionbench,mergekit} {ta,ties,dare,consensus} DIR T OUT`` loads
DIR/pretrained.safetensors and DIR/task_{t}.safetensors with safetensors.torch, merges with the
peer's own in-memory API, writes OUT, and prints one JSON line: phase times (s), peak RSS of this
process and its RSS after imports (bytes).

FusionBench 0.2.33: task arithmetic = its state-dict helpers in the order of
``task_arithmetic_merge``; TIES = ``ties_merging_utils`` (flatten to T x N, ``ties_merging``,
``vector_to_state_dict``) as ``TiesMergingAlgorithm.run``; DARE = ``module_random_drop_`` on
the task vectors then ``state_dict_sum`` as ``DareTaskArithmetic.run``; Consensus (no algorithm
class in FusionBench) = its TALL helper ``generate_task_masks`` + count >= 2, as
``construct_consensus_mask``. MergeKit 0.1.5: ``merge_methods.merge_state_dicts`` with
``task_arithmetic``, ``ties``, ``dare_linear``; MergeKit has no Consensus method.
"""

import importlib
import json
import resource
import sys
import time


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def run_fusionbench(method, p0, fts):
    import torch
    from fusion_bench.utils.state_dict_arithmetic import (
        state_dict_add,
        state_dict_mul,
        state_dict_sub,
        state_dict_sum,
    )

    if method == "ta":
        tv = None
        for ft in fts:
            d = state_dict_sub(ft, p0)
            tv = d if tv is None else state_dict_add(tv, d)
        return state_dict_add(p0, state_dict_mul(tv, 0.3))
    if method == "dare":
        from fusion_bench.method.dare.utils import module_random_drop_

        tvs = [state_dict_sub(ft, p0) for ft in fts]
        for tv in tvs:
            module_random_drop_(tv, 0.9, rescale=True)
        total = state_dict_sum(tvs)
        return {k: p0[k] + 0.3 * total[k] for k in p0}
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        ties_merging,
        vector_to_state_dict,
    )

    flat_ft = torch.vstack([state_dict_to_vector(ft) for ft in fts])
    flat_ptm = state_dict_to_vector(p0)
    tv_flat = flat_ft - flat_ptm
    if method == "ties":
        merged = ties_merging(tv_flat, reset_thresh=20, merge_func="mean")
        return vector_to_state_dict(flat_ptm + 1.0 * merged, p0)
    from fusion_bench.method.tall_mask.utils import generate_task_masks

    masks = generate_task_masks(tv_flat, flat_ft, flat_ptm, tall_mask_lambda=0.4)
    cons = masks.float().sum(0) >= 2
    return vector_to_state_dict(flat_ptm + 0.3 * tv_flat.sum(0) * cons, p0)


def run_mergekit(method, p0, fts):
    from mergekit.merge_methods.api import merge_state_dicts

    models = {"base": p0, **{f"t{i}": ft for i, ft in enumerate(fts)}}
    name, params = {
        "ta": ("task_arithmetic", {"weight": 0.3, "normalize": False}),
        "ties": ("ties", {"weight": 1.0, "density": 0.2}),
        "dare": ("dare_linear", {"weight": 0.3, "density": 0.1, "normalize": False}),
    }[method]
    return merge_state_dicts(models, name, parameters=params, base="base")


def main(argv):
    lib, method, d, num_tasks, out = argv[0], argv[1], argv[2], int(argv[3]), argv[4]
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    # imported before base_rss is read: the RSS after imports includes the peer library
    importlib.import_module("mergekit.merge_methods" if lib == "mergekit" else "fusion_bench.utils.state_dict_arithmetic")
    base_rss = rss_now()
    t0 = time.perf_counter()
    p0 = load_file(f"{d}/pretrained.safetensors")
    fts = [load_file(f"{d}/task_{t}.safetensors") for t in range(num_tasks)]
    t1 = time.perf_counter()
    with torch.no_grad():
        merged = (run_fusionbench if lib == "fusionbench" else run_mergekit)(method, p0, fts)
    t2 = time.perf_counter()
    save_file({k: v.contiguous() for k, v in merged.items()}, out)
    t3 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": t1 - t0, "merge_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t0,
                      "peak_rss": peak, "base_rss": base_rss}))


if __name__ == "__main__":
    main(sys.argv[1:])
