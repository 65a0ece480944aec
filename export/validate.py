"""Does the exported INT8 encoder still recommend like the PyTorch model? Fail loudly if not."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


class QualityCheckFailed(RuntimeError):
    """The exported model drifted too far from PyTorch; the bundle is not written."""


@dataclass(frozen=True)
class QualityThresholds:
    min_mean_cosine: float = 0.98  # INT8 vs PyTorch vectors, users and items
    min_cosine: float = 0.90  # the worst single text
    min_top10_overlap: float = 0.70  # mean overlap of each user's top 10, INT8 vs PyTorch (FP32, exact)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def compare(
    reference_users: np.ndarray,
    reference_items: np.ndarray,
    exported_users: np.ndarray,
    exported_items: np.ndarray,
    score: callable,
    thresholds: QualityThresholds = QualityThresholds(),
) -> dict[str, float]:
    """Compare vectors (unit rows) and the rankings they produce; raise QualityCheckFailed below thresholds.

    score(users, items) -> (n_users, n_items) turns encoder vectors into served scores (id part, bias).
    """
    cosines = np.concatenate(
        [(reference_users * exported_users).sum(1), (reference_items * exported_items).sum(1)]
    )
    reference_top = top_k(score(reference_users, reference_items), 10)
    exported_top = top_k(score(exported_users, exported_items), 10)
    overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(reference_top, exported_top)])
    report = {
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
        "top10_overlap": float(overlap),
        "users_checked": int(len(reference_users)),
        "items_checked": int(len(reference_items)),
        "thresholds": asdict(thresholds),
    }
    failures = [
        f"{name} {value:.4f} < {limit}"
        for name, value, limit in (
            ("mean cosine", report["mean_cosine"], thresholds.min_mean_cosine),
            ("min cosine", report["min_cosine"], thresholds.min_cosine),
            ("top-10 overlap", report["top10_overlap"], thresholds.min_top10_overlap),
        )
        if value < limit
    ]
    if failures:
        raise QualityCheckFailed("INT8 export failed its quality check: " + "; ".join(failures))
    return report


def sample_rows(n: int, limit: int, seed: int = 0) -> Sequence[int]:
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, limit), replace=False))
