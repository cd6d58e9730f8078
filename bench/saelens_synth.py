"""Rows from SAELens's own synthetic toolkit (`sae_lens.synthetic.SyntheticModel`), for bench.quality.

Run in the environment where SAELens is installed (bench.quality starts it there):

    python -m bench.saelens_synth --features 1024 --d 128 --train-rows N --val-rows M --seed 0 --out DIR

The model has Zipfian firing probabilities, a one-level hierarchy (children fire only with their
parent) and low-rank correlated firing, scaled down from SynthSAEBench's settings to what a 2-core
CPU trains in minutes. Writes DIR/train.npy, DIR/val.npy and DIR/truth.npz (the held-out rows'
feature activations and the unit feature vectors) and prints the true mean L0 as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from bench.anchors.run_one import hide_broken_torchvision

    p = argparse.ArgumentParser(prog="python -m bench.saelens_synth")
    p.add_argument("--features", type=int, required=True)
    p.add_argument("--d", type=int, required=True)
    p.add_argument("--train-rows", type=int, required=True)
    p.add_argument("--val-rows", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    hide_broken_torchvision()
    from sae_lens.synthetic import (
        HierarchyConfig,
        LowRankCorrelationConfig,
        SyntheticModel,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    cfg = SyntheticModelConfig(
        num_features=args.features, hidden_dim=args.d,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.14, min_prob=0.0105),
        hierarchy=HierarchyConfig(total_root_nodes=args.features // 8, branching_factor=4, max_depth=1),
        correlation=LowRankCorrelationConfig(rank=16, correlation_scale=0.1),
        std_firing_magnitudes=0.2, seed=args.seed)
    torch.manual_seed(args.seed)
    model = SyntheticModel(cfg)
    with torch.no_grad():
        train = torch.cat([model.sample(min(65536, args.train_rows - i)) for i in range(0, args.train_rows, 65536)])
        val, codes = model.sample_with_features(args.val_rows)
        atoms = model.feature_dict.feature_vectors.detach()
    np.save(f"{args.out}/train.npy", train.float().numpy())
    np.save(f"{args.out}/val.npy", val.float().numpy())
    np.savez(f"{args.out}/truth.npz", codes=codes.float().numpy(),
             atoms=(atoms / atoms.norm(dim=1, keepdim=True)).float().numpy())
    print(json.dumps({"true_l0": (codes > 0).sum(1).float().mean().item()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
