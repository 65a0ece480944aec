"""Cold-start map: an item's trained id vector and bias predicted from its text vector (numpy only).

A trained item is served as normalize(text + id vector) with its learned bias; an item the model never trained
on has neither. Without them it enters with a zero id vector and a middling bias and loses to trained items
that the users' vectors were fitted to. The map is a ridge regression fitted on the trained items (the
"generator" of DropoutNet/Heater-style cold start, in its simplest form):

    [id vector, bias] = [text vector, 1] @ weights

fitted after training, on items that were training targets (their id vectors and biases were learned), with
the ridge strengths chosen by k-fold error on held-out trained items. Training applies it to catalogue items
that were never a training target, export to items the checkpoint does not know, and the server to every
upserted item: one matrix product on the text vector the upsert encodes anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Ridge strengths tried, per target block (id vector, bias); chosen by k-fold error on trained items.
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)
FOLDS = 5


@dataclasses.dataclass(frozen=True)
class ColdStartMap:
    """weights: (dim + 1, dim + 1) float32; [text vector, 1] @ weights = [id vector, bias]."""

    weights: np.ndarray

    def __post_init__(self) -> None:
        weights = np.asarray(self.weights)
        if weights.ndim != 2 or weights.shape[0] != weights.shape[1] or not np.isfinite(weights).all():
            raise ValueError(f"a cold-start map is a finite square (dim + 1) matrix, got shape {weights.shape}")

    @property
    def dimension(self) -> int:
        return self.weights.shape[0] - 1

    def predict(self, text_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) text vectors -> ((n, dim) id vectors, (n,) biases), float32."""
        text = np.asarray(text_vectors, dtype=np.float32)
        out = text @ self.weights[:-1] + self.weights[-1]
        return out[:, :-1], out[:, -1]

    def scaled(self, bias_scale: float) -> ColdStartMap:
        """The same map with its bias output multiplied by bias_scale (the bundle stores the index row's bias
        column, temperature * bias)."""
        weights = np.array(self.weights, dtype=np.float32, copy=True)
        weights[:, -1] *= np.float32(bias_scale)
        return ColdStartMap(weights)


@dataclasses.dataclass(frozen=True)
class ColdStartFit:
    """A fitted map and how it was chosen: held-out R^2 of each block at the chosen strengths."""

    map: ColdStartMap
    items: int  # trained items it was fitted on
    id_alpha: float
    bias_alpha: float
    id_r2: float  # k-fold held-out R^2 of the id vectors (all coordinates pooled)
    bias_r2: float  # k-fold held-out R^2 of the bias


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """(dim + 1, outputs) weights of a ridge fit with an unpenalised intercept (last row)."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return np.vstack([coef, (y_mean - x_mean @ coef)[None, :]])


def _held_out_r2(x: np.ndarray, y: np.ndarray, alpha: float, folds: Sequence[np.ndarray]) -> float:
    error = 0.0
    for fold in folds:
        train = np.ones(len(x), dtype=bool)
        train[fold] = False
        weights = _ridge(x[train], y[train], alpha)
        error += float(((x[fold] @ weights[:-1] + weights[-1] - y[fold]) ** 2).sum())
    return 1.0 - error / max(float(((y - y.mean(0)) ** 2).sum()), 1e-12)


def fit_cold_start_map(text_vectors: np.ndarray, id_vectors: np.ndarray, biases: np.ndarray,
                       seed: int = 0, alphas: Sequence[float] = ALPHAS, folds: int = FOLDS) -> ColdStartFit:
    """Fit the map on trained items (rows: their text vectors, learned id vectors and biases); each block's
    strength is the one with the best k-fold held-out R^2."""
    x = np.asarray(text_vectors, dtype=np.float64)
    ids = np.asarray(id_vectors, dtype=np.float64)
    bias = np.asarray(biases, dtype=np.float64)[:, None]
    if len(x) < 2 * folds:
        raise ValueError(f"a cold-start map needs at least {2 * folds} trained items, got {len(x)}")
    split = np.array_split(np.random.default_rng(seed).permutation(len(x)), folds)
    chosen = []
    for y in (ids, bias):
        scores = [_held_out_r2(x, y, alpha, split) for alpha in alphas]
        best = int(np.argmax(scores))
        chosen.append((alphas[best], scores[best], _ridge(x, y, alphas[best])))
    (id_alpha, id_r2, id_weights), (bias_alpha, bias_r2, bias_weights) = chosen
    weights = np.hstack([id_weights, bias_weights]).astype(np.float32)
    return ColdStartFit(ColdStartMap(weights), len(x), id_alpha, bias_alpha, round(id_r2, 4), round(bias_r2, 4))
