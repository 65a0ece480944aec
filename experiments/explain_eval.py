"""Are explanations faithful? Remove the top-attributed history item and see whether the score drops more.

    python -m experiments.explain_eval --target 127.0.0.1:50051 --interactions data/ml-100k/ml-100k.inter \\
        --users 200 --out explain_eval.json

For each sampled user with history H (the most recent --history-length distinct catalogued items):
1. Recommend(H, k, explain=True, exclude_history=True): every recommended item r names its top-attributed
   history item t (the HISTORY_ITEM reason with the largest weight);
2. for every distinct h in H, the user vector without h comes from Embed (one user per call, exactly the
   vector Recommend would compute) and r's score from its index row (GetItem include_vector):
   score(H, r) = [user vector, 1] . row(r), the server's scoring contract;
3. drop(h) = score(H, r) - score(H without h, r). The explanation is faithful for (user, r) when
   drop(t) > drop(random other history item). The rate over all (user, r) pairs is the headline number;
   a rate near 0.5 would mean the attribution is no better than chance.
Also reported: how often t is the single most damaging removal, the same rate for a naive "most recent
item" attribution, and the mean drops.

Histories come from --histories (a JSON list of lists of catalogue ids, oldest first), from --interactions
(RecBole .inter, tab-separated with user_id/item_id/timestamp columns, or a CSV user_id,item_id,timestamp),
or, with neither, from random catalogue ids.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from llmrec.clients.client import RecommenderClient


def read_interactions(path: Path) -> dict[str, list[str]]:
    """user id -> item ids, oldest first, from a RecBole .inter file or a user_id,item_id[,timestamp] CSV."""
    rows: list[tuple[str, str, float, int]] = []
    with path.open(encoding="utf-8", newline="") as handle:
        first = handle.readline()
        delimiter = "\t" if "\t" in first else ","
        names = [name.split(":")[0].strip() for name in first.rstrip("\n").split(delimiter)]
        try:
            user_col, item_col = names.index("user_id"), names.index("item_id")
        except ValueError:
            raise SystemExit(f"{path}: the header needs user_id and item_id columns, got {names}") from None
        time_col = names.index("timestamp") if "timestamp" in names else None
        for order, row in enumerate(csv.reader(handle, delimiter=delimiter)):
            if len(row) <= max(user_col, item_col):
                continue
            stamp = float(row[time_col]) if time_col is not None and row[time_col] else 0.0
            rows.append((row[user_col], row[item_col], stamp, order))
    rows.sort(key=lambda r: (r[0], r[2], r[3]))
    histories: dict[str, list[str]] = defaultdict(list)
    for user, item, _, _ in rows:
        histories[user].append(item)
    return dict(histories)


def recent_distinct(items: list[str], length: int, catalogue: set[str]) -> list[str]:
    """The most recent `length` distinct catalogued items, oldest first."""
    picked: list[str] = []
    for item in reversed(items):
        if item in catalogue and item not in picked:
            picked.append(item)
            if len(picked) == length:
                break
    return picked[::-1]


def sample_histories(args, catalogue_ids: list[str], rng: random.Random) -> list[list[str]]:
    catalogue = set(catalogue_ids)
    if args.histories:
        raw = json.loads(Path(args.histories).read_text())
        candidates = [recent_distinct([str(i) for i in h], args.history_length, catalogue) for h in raw]
    elif args.interactions:
        by_user = read_interactions(Path(args.interactions))
        candidates = [recent_distinct(by_user[u], args.history_length, catalogue) for u in sorted(by_user)]
    else:
        candidates = [rng.sample(catalogue_ids, min(args.history_length, len(catalogue_ids)))
                      for _ in range(args.users)]
    candidates = [h for h in candidates if len(h) >= 3]  # a top item and at least two others to compare
    rng.shuffle(candidates)
    return candidates[: args.users]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.explain_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--interactions", help="RecBole .inter or user_id,item_id,timestamp CSV")
    source.add_argument("--histories", help="JSON list of histories (lists of catalogue ids, oldest first)")
    parser.add_argument("--users", type=int, default=200, help="users to sample")
    parser.add_argument("--history-length", type=int, default=10, help="most recent distinct items per user")
    parser.add_argument("--k", type=int, default=5, help="recommended items checked per user")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("explain_eval.json"), help="JSON result file")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    with RecommenderClient(args.target, timeout_s=60) as client:
        client.wait_until_serving(timeout_s=120)
        info = client.model_info()
        if args.history_length > info.max_history_items:
            parser.error(f"--history-length must be at most {info.max_history_items}")
        catalogue_ids = [item.item_id for item in client.iter_items()]
        histories = sample_histories(args, catalogue_ids, rng)
        rows: dict[str, np.ndarray] = {}

        def row(item_id: str) -> np.ndarray:
            if item_id not in rows:
                rows[item_id] = np.asarray(client.get_item(item_id, include_vector=True).vector, dtype=np.float64)
            return rows[item_id]

        def user_vector(history: list[str]) -> np.ndarray:
            vector = np.asarray(client.embed(users=[{"history": history}]).users[0], dtype=np.float64)
            return np.append(vector, 1.0)

        pairs = []
        max_score_gap = 0.0
        for history in histories:
            result = client.recommend(history, k=args.k, explain=True, exclude_history=True)
            full = user_vector(history)
            without = {h: user_vector([x for x in history if x != h]) for h in history}
            for item in result.items:
                reasons = [r for r in item.explanation.reasons if r.kind == "history_item"] if item.explanation else []
                if not reasons:
                    continue
                top = reasons[0].item_id
                others = [h for h in history if h != top]
                base = float(full @ row(item.item_id))
                max_score_gap = max(max_score_gap, abs(base - item.score))
                drops = {h: base - float(without[h] @ row(item.item_id)) for h in history}
                random_other = rng.choice(others)
                recent = history[-1]
                recent_other = rng.choice([h for h in history if h != recent])
                pairs.append({
                    "top_drop": drops[top], "random_drop": drops[random_other],
                    "top_is_largest_drop": drops[top] >= max(drops.values()),
                    "recent_beats_random": drops[recent] > drops[recent_other],
                })

    if not pairs:
        raise SystemExit("no explained recommendations to evaluate")
    rate = float(np.mean([p["top_drop"] > p["random_drop"] for p in pairs]))
    report = {
        "evaluation": "explanation faithfulness: removing the top-attributed history item vs a random one",
        "target": args.target,
        "model_version": info.model_version,
        "index_version": info.index_version,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "users": len(histories),
        "pairs": len(pairs),
        "faithfulness_rate": rate,
        "top_is_largest_drop_rate": float(np.mean([p["top_is_largest_drop"] for p in pairs])),
        "recency_baseline_rate": float(np.mean([p["recent_beats_random"] for p in pairs])),
        "mean_top_drop": float(np.mean([p["top_drop"] for p in pairs])),
        "mean_random_drop": float(np.mean([p["random_drop"] for p in pairs])),
        "max_recommend_vs_embed_score_gap": max_score_gap,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"faithfulness: removing the top-attributed history item lowered the score more than removing a random "
          f"one for {rate:.1%} of {len(pairs)} (user, item) pairs from {len(histories)} users "
          f"(top item was the most damaging removal {report['top_is_largest_drop_rate']:.1%}; "
          f"'most recent item' baseline {report['recency_baseline_rate']:.1%})")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
