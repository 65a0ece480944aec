"""Full-ranking evaluation: every example is ranked against the whole catalogue (never sampled negatives)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from llmrec.training.data import Example, Interactions, item_popularity, train_sequences
from llmrec.training.progress import progress

ScoreFn = Callable[[Sequence[Example]], np.ndarray]  # examples -> (len(examples), num_items) scores


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target; ties are broken by item number, so constant scores earn no credit."""
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    higher = (scores > target_scores).sum(1)
    tied_before = ((scores == target_scores) & (np.arange(scores.shape[1]) < targets[:, None])).sum(1)
    return higher + tied_before


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K (= hit rate with one target) and NDCG@K from 0-based ranks."""
    metrics = {}
    for k in ks:
        hit = ranks < k
        metrics[f"recall@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        metrics[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if len(ranks) else 0.0
    return metrics


def cold_items(data: Interactions) -> np.ndarray:
    """Boolean mask of items never seen as a training target (position >= 1 of a training sequence)."""
    seen = np.zeros(data.num_items, dtype=bool)
    for seq in train_sequences(data):
        seen[seq[1:]] = True
    return ~seen


def evaluate(
    score_fn: ScoreFn,
    data: Interactions,
    examples: Sequence[Example],
    ks: Sequence[int] = (10, 50),
    batch_size: int = 256,
    *,
    desc: str = "evaluate",
    return_ranks: bool = False,
) -> dict[str, float] | tuple[dict[str, float], np.ndarray]:
    """Recall/NDCG@K over all examples and over the cold-target subset, coverage@10 and popular share@10; with
    return_ranks, also each example's 0-based target rank (per-user metrics, for paired comparisons).

    Memory: score_fn is asked for batch_size examples at a time, so at most one (batch_size, num_items) score
    matrix is alive; what is kept per example is its target rank and top 10. desc: the progress bar's name."""
    targets = np.array([data.sequences[e.user][e.target_position] for e in examples])
    ranks = np.empty(len(examples), dtype=np.int64)
    top10 = np.empty((len(examples), 10), dtype=np.int64)
    bar = progress(total=len(examples), desc=desc, unit="user")
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        scores = np.asarray(score_fn(batch), dtype=np.float64)
        if not np.isfinite(scores).all():  # NaN compares false and would rank every target first
            raise ValueError("scores contain NaN or infinity; this is a bug in the model being evaluated")
        ranks[start : start + len(batch)] = target_ranks(scores, targets[start : start + len(batch)])
        top10[start : start + len(batch)] = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        bar.update(len(batch))
    bar.close()
    popularity = item_popularity(data)
    popular = popularity >= np.quantile(popularity, 0.9)  # the 10% most interacted-with items
    cold = cold_items(data)[targets]
    metrics = ranking_metrics(ranks, ks)
    metrics.update({f"cold_{name}": value for name, value in ranking_metrics(ranks[cold], ks).items()})
    metrics["cold_examples"] = int(cold.sum())
    metrics["examples"] = len(examples)
    metrics["coverage@10"] = float(len(np.unique(top10)) / data.num_items)
    metrics["popular_share@10"] = float(popular[top10].mean())
    return (metrics, ranks) if return_ranks else metrics


def popularity_scores(data: Interactions) -> ScoreFn:
    popularity = item_popularity(data)
    return lambda examples: np.broadcast_to(popularity, (len(examples), data.num_items))
