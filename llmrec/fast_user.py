"""The fast path's user vector: the encoder's user vector predicted from the history's item vectors (numpy only).

The fast path (docs/serving.md) runs no encoder. With a zero user vector it loses what the user tower reads and the
history vector and the sequence model do not: mostly how much the latest items weigh. This map is a ridge
regression from vectors the catalogue already holds to the encoder's user vector (a distillation of the user
tower: it needs no targets, only the user vectors that calibration encodes anyway):

    user vector ~ [f_1, ..., f_m, 1] @ weights
    f_j = normalize(decayed sum of the r_j most recent item vectors, decay d_j), (r_j, d_j) in FEATURE_RECENCIES

The sequence model's vector is not an input: on validation it added nothing to the held-out R^2 (MovieLens 0.359
both ways, Scientific 0.553 with it, 0.555 without), and reading it would run the sequence model on every fast
request even where the fast path's own sequence weight is 0. Training fits it on the validation users' vectors
(the ridge strength chosen by k-fold held-out R^2) and chooses the fast path's adjustments with each fold's vectors
predicted by the map fitted on the other folds, so that the adjustments trust the map as far as it predicts
unseen users; export writes it into the bundle (model/fast_user_map.npy); the server applies it to every
fast-path request: one (features x dim) product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# (most recent items read, decay): the latest item, the last few (about what the user tower's token window holds),
# and the history vector's own window.
FEATURE_RECENCIES = ((1, 1.0), (4, 0.5), (20, 0.8))
ALPHAS = (0.1, 1.0, 10.0, 100.0)
FOLDS = 5


def features(history_item_vectors: Sequence[np.ndarray], dimension: int) -> np.ndarray:
    """(n, len(FEATURE_RECENCIES) * dim + 1) float32, the map's input: per user (item vectors oldest first, zero
    rows for items deleted since), the normalised decayed sum of their most recent item vectors at each
    FEATURE_RECENCIES, then a constant 1."""
    out = np.zeros((len(history_item_vectors), len(FEATURE_RECENCIES) * dimension + 1), np.float32)
    out[:, -1] = 1.0
    for row, vectors in enumerate(history_item_vectors):
        latest_first = np.asarray(vectors, dtype=np.float32)[::-1]
        for n, (recent_items, decay) in enumerate(FEATURE_RECENCIES):
            recent = latest_first[:recent_items]
            summed = (decay ** np.arange(len(recent), dtype=np.float32)) @ recent if len(recent) else 0.0
            norm = float(np.linalg.norm(summed))
            if norm > 0:
                out[row, n * dimension : (n + 1) * dimension] = summed / norm
    return out


@dataclasses.dataclass(frozen=True)
class FastUserMap:
    """weights: (len(FEATURE_RECENCIES) * dim + 1, dim) float32; features(...) @ weights = the predicted user
    vector."""

    weights: np.ndarray

    def __post_init__(self) -> None:
        weights = np.asarray(self.weights)
        square = weights.ndim == 2 and weights.shape[0] == len(FEATURE_RECENCIES) * weights.shape[1] + 1
        if not square or not np.isfinite(weights).all():
            raise ValueError(f"a fast-path user map is a finite {len(FEATURE_RECENCIES)} * dim + 1 by dim matrix, "
                             f"got shape {weights.shape}")

    @property
    def dimension(self) -> int:
        return self.weights.shape[1]

    @property
    def items_read(self) -> int:
        """How many of the most recent history items the map reads."""
        return max(recent for recent, _ in FEATURE_RECENCIES)

    def user_vectors(self, history_item_vectors: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 predicted user vectors of histories (item vectors oldest first)."""
        return (features(history_item_vectors, self.dimension) @ self.weights).astype(np.float32)

    def catalogue_user_vectors(self, unit_vectors: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """user_vectors of histories given as item numbers (rows of unit_vectors, oldest first)."""
        return (catalogue_features(unit_vectors, histories) @ self.weights).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FastUserFit:
    """A fitted map, its held-out predictions of the users it was fitted on (each fold's by the map fitted on the
    other folds) and how it was chosen."""

    map: FastUserMap
    held_out: np.ndarray  # (n, dim) float32
    alpha: float
    held_out_r2: float  # at alpha: 1 - squared error / the user vectors' variance around their mean

    def as_json(self) -> dict:
        return {"users": len(self.held_out), "alpha": self.alpha, "held_out_r2": self.held_out_r2,
                "feature_recencies": [list(r) for r in FEATURE_RECENCIES]}


def _ridge(inputs: np.ndarray, targets: np.ndarray, alpha: float) -> np.ndarray:
    gram = inputs.T.astype(np.float64) @ inputs
    gram[np.diag_indices_from(gram)] += alpha
    gram[-1, -1] -= alpha  # the constant column is not shrunk
    return np.linalg.solve(gram, inputs.T.astype(np.float64) @ targets).astype(np.float32)


def catalogue_features(unit_vectors: np.ndarray, histories: Sequence[np.ndarray], chunk_users: int = 4096,
                       ) -> np.ndarray:
    """features() of users whose histories are item numbers (rows of unit_vectors, oldest first), a chunk of users
    at a time so that only their most recent items are ever copied."""
    unit = np.asarray(unit_vectors, dtype=np.float32)
    recent = max(r for r, _ in FEATURE_RECENCIES)
    parts = [features([unit[np.asarray(h, dtype=np.int64)[-recent:]] for h in histories[start : start + chunk_users]],
                      unit.shape[1])
             for start in range(0, len(histories), chunk_users)]
    return np.concatenate(parts) if parts else features([], unit.shape[1])


def fit(inputs: np.ndarray, user_vectors: np.ndarray, seed: int = 0, folds: int = FOLDS) -> FastUserFit:
    """The map from users' features (features(), catalogue_features()) to their encoder user vectors, the ridge
    strength chosen among ALPHAS by held-out R^2 over `folds` seeded folds of the users."""
    targets = np.asarray(user_vectors, dtype=np.float32)
    fold_of = np.random.default_rng(seed).permutation(len(targets)) % max(2, min(folds, len(targets)))
    variance = float(((targets - targets.mean(axis=0)) ** 2).sum()) or 1.0
    best = None
    for alpha in ALPHAS:
        held_out = np.zeros_like(targets)
        for fold in np.unique(fold_of):
            train = fold_of != fold
            held_out[~train] = inputs[~train] @ _ridge(inputs[train], targets[train], alpha)
        r2 = 1.0 - float(((held_out - targets) ** 2).sum()) / variance
        if best is None or r2 > best[1]:
            best = (alpha, r2, held_out)
    alpha, r2, held_out = best
    return FastUserFit(FastUserMap(_ridge(inputs, targets, alpha)), held_out, alpha, r2)
