"""The hnswlib index over the bundle's item rows (llmrec.scoring.item_rows)."""

from __future__ import annotations

import hnswlib
import numpy as np


def build_hnsw(vectors: np.ndarray, m: int, ef_construction: int, ef_search: int) -> hnswlib.Index:
    """Inner-product HNSW; labels are row numbers. Deleted slots may be reused (catalogue updates)."""
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), ef_construction=ef_construction, M=m, allow_replace_deleted=True)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(ef_search)
    return index


def hnsw_recall(index: hnswlib.Index, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean share of the exact top k that HNSW also returns."""
    k = min(k, len(vectors))
    exact = np.argpartition(-(queries @ vectors.T), k - 1, axis=1)[:, :k]
    approximate, _ = index.knn_query(queries, k=k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, approximate)]))
