"""How strongly negative feedback moves a ranking, per rejected-item weight, on a bundle's catalogue.

    python -m experiments.rejection_weight --bundle bundles/ml-100k/<version> [--users 300] [--weights 0.1,0.3,0.5]

Simulated users (no training data holds rejections): a user vector is the normalised mean of 3 random catalogue
items; the user rejects their top item. For each weight (llmrec.scoring, ScoringRule.rejected_weight), reports
the share of the other top-10 items close to the rejected one (cosine > --close) that stay in the top 10, and
the share of those unlike it (cosine <= --unlike) that stay. A good weight takes most close ones out and keeps
nearly all unlike ones. This chose llmrec.scoring.DEFAULT_REJECTED_WEIGHT.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llmrec import manifest as mf
from llmrec.scoring import ScoringRule


def measure(rows: np.ndarray, weights: list[float], users: int, close: float, unlike: float, seed: int) -> dict:
    unit = rows[:, :-1]
    rng = np.random.default_rng(seed)
    histories = [rng.choice(len(rows), 3, replace=False) for _ in range(users)]
    vectors = np.stack([unit[h].mean(axis=0) for h in histories])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    report = {}
    for weight in weights:
        rule = ScoringRule(rejected_weight=weight)
        before = rule.dense_scores(vectors, rows, [[] for _ in histories], None)
        close_kept, unlike_kept = [], []
        for user, history in enumerate(histories):
            scores = before[user].copy()
            scores[history] = -np.inf
            top = np.argsort(-scores, kind="stable")[:10]
            rejected = int(top[0])
            after = rule.dense_scores(vectors[user:user + 1], rows, [[]], None, rejected=[[rejected]])[0]
            after[history] = after[rejected] = -np.inf
            kept = set(np.argsort(-after, kind="stable")[:10].tolist())
            similarity = unit[top[1:]] @ unit[rejected]
            close_kept += [int(item) in kept for item, s in zip(top[1:], similarity) if s > close]
            unlike_kept += [int(item) in kept for item, s in zip(top[1:], similarity) if s <= unlike]
        report[str(weight)] = {"close_kept": float(np.mean(close_kept)) if close_kept else None,
                               "close_items": len(close_kept),
                               "unlike_kept": float(np.mean(unlike_kept)) if unlike_kept else None,
                               "unlike_items": len(unlike_kept)}
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.rejection_weight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle directory")
    parser.add_argument("--weights", default="0.1,0.2,0.3,0.5,0.75,1.0")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--close", type=float, default=0.65, help="cosine above which an item is like the rejected")
    parser.add_argument("--unlike", type=float, default=0.5, help="cosine at or below which it is not")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    mf.read_manifest(args.bundle)
    rows = np.load(args.bundle / mf.VECTORS_FILE)
    report = measure(rows, [float(w) for w in args.weights.split(",")], args.users, args.close, args.unlike,
                     args.seed)
    for weight, result in report.items():
        print(f"weight {weight:>5}: close items kept in the top 10 {result['close_kept']:.2f} "
              f"(of {result['close_items']}), unlike items kept {result['unlike_kept']:.2f} "
              f"(of {result['unlike_items']})")
    print(json.dumps({"bundle": str(args.bundle), "settings": {k: str(v) for k, v in vars(args).items()},
                      "weights": report}))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
