"""The history vector: the user's recent items, read through their item vectors, added to the user's query.

The text model reads only the items that fit its token window (about 4 Amazon titles in 128 tokens), yet the
catalogue's item vectors (text + trained id part) hold every item. The served query adds a decayed sum of the
item vectors of the user's RECENT_ITEMS most recent catalogued items (j = 0 for the latest):

    query = user_vector + weight * sum_j RECENCY_DECAY**j * item_vector(h_j)

It is linear in the item vector, so scores stay one inner product and the HNSW index searches the query
directly. The weight is chosen on validation users after training (0 turns it off). Training evaluation,
export evaluation and the server all build it here (numpy only).
"""

from __future__ import annotations

import numpy as np

RECENT_ITEMS = 20
RECENCY_DECAY = 0.8


def history_vector(item_vectors: np.ndarray, recent_items: int = RECENT_ITEMS,
                   recency_decay: float = RECENCY_DECAY) -> np.ndarray:
    """(history length, dim) item vectors, oldest first -> the (dim,) decayed sum of the most recent ones."""
    item_vectors = np.asarray(item_vectors, dtype=np.float32)
    recent = item_vectors[len(item_vectors) - min(len(item_vectors), max(recent_items, 0)):][::-1]
    weights = recency_decay ** np.arange(len(recent), dtype=np.float32)
    return (weights @ recent).astype(np.float32) if len(recent) else np.zeros(item_vectors.shape[1], np.float32)
