"""Quality of a served bundle: the INT8 encoder with exact search, and INT8 + HNSW through the server's code."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmrec.template import render_user
from llmrec.server.bundle import LoadedBundle
from llmrec.server.domain import HistoryRef, RecommendQuery, UserInput
from llmrec.server.encoding import AsyncEncoder
from llmrec.server.recommender import Recommender
from llmrec.server.validation import Limits
from llmrec.training.data import Example, Interactions, user_text
from llmrec.scoring import ScoringRule
from llmrec.training.evaluation import ScoreFn, evaluate
from llmrec.training.calibration import histories
from llmrec.training.progress import phase, progress

_UNRANKED = -1e9  # score for items HNSW did not return: below every returned one


def evaluate_bundle(
    bundle_dir: Path, data: Interactions, examples: Sequence[Example], use_context: bool, ks: Sequence[int] = (10, 50)
) -> dict:
    """{"deployed": {"int8_exact": metrics, "int8_hnsw_server": metrics}, "published": {"int8_exact": metrics},
    "served_ranks": each example's target rank on the server path} on the given examples.

    Deployed: the manifest's scoring rule. Published: the same rule with history item score 0, INT8 exact search
    only: the server path applies the manifest's history item score, so it has no published row.

    Users are encoded one request at a time, as the server encodes them (dynamic INT8 depends on the batch).
    The server path ranks only its top max(ks) items; a target below that counts as a miss, as it would in
    production. Memory: (users x dim) user and sequence vectors and each user's top max(ks) items; scores are
    made 256 users at a time (evaluate).
    """
    bundle = LoadedBundle.load(bundle_dir, prefer_gpu=False, min_ef=max(ks))
    manifest = bundle.manifest
    columns = np.array([bundle.row_of[item_id] for item_id in data.item_ids])  # data item -> bundle row
    vectors = np.asarray(bundle.vectors)[columns]
    users = [user_text(data, e, use_context) for e in examples]
    with phase(f"bundle: encode {len(users)} users one request at a time"):
        user_vectors = np.vstack(
            [bundle.encoder.encode([render_user(u, manifest.max_history_items)], manifest.max_user_tokens)
             for u in progress(users, desc="bundle: encode users (INT8)", unit="user")]
        )
    row_to_item = {row: i for i, row in enumerate(columns)}
    data_item_of_row = np.full(len(bundle.item_ids), -1, dtype=np.int64)
    data_item_of_row[columns] = np.arange(len(columns))
    rule = manifest.scoring_rule()
    cooccurrence = bundle.cooccurrence.renumber(data_item_of_row, data.num_items)
    unit_vectors = vectors[:, : manifest.dimension]
    history = histories(data, examples)
    sequence_vectors = _sequence_vectors(bundle, unit_vectors, history) if rule.adjustments.sequence_weight else None
    with phase(f"bundle: {len(users)} requests through the server's code"):
        # each response becomes its items' numbers at once: 50,000 responses of 50 items kept whole are ~0.5 GB
        served = asyncio.run(_recommend_all(
            bundle, data, examples, users, max(ks),
            lambda items: np.array([row_to_item[bundle.row_of[item.item_id]] for item in items], dtype=np.int64)))
    by_position = {id(e): n for n, e in enumerate(examples)}

    def exact(rule: ScoringRule) -> ScoreFn:
        def score(batch: Sequence[Example]) -> np.ndarray:
            rows = [by_position[id(e)] for e in batch]
            return rule.dense_scores(user_vectors[rows], vectors, [history[r] for r in rows], cooccurrence,
                                     None if sequence_vectors is None else sequence_vectors[rows])
        return score

    def server_ranks(batch: Sequence[Example]) -> np.ndarray:
        scores = np.full((len(batch), data.num_items), _UNRANKED)
        for n, e in enumerate(batch):
            ranked = served[by_position[id(e)]]
            scores[n, ranked] = -np.arange(1, len(ranked) + 1)
        return scores

    published = dataclasses.replace(rule, adjustments=dataclasses.replace(rule.adjustments, history_item_score=0.0))
    served_metrics, served_ranks = evaluate(server_ranks, data, examples, ks, desc="evaluate int8_hnsw_server",
                                            return_ranks=True)
    return {"deployed": {"int8_exact": evaluate(exact(rule), data, examples, ks, desc="evaluate int8_exact"),
                         "int8_hnsw_server": served_metrics},
            "published": {"int8_exact": evaluate(exact(published), data, examples, ks,
                                                 desc="evaluate int8_exact (published)")},
            "served_ranks": served_ranks.tolist()}


def _sequence_vectors(bundle: LoadedBundle, unit_vectors: np.ndarray, history: list[np.ndarray],
                      chunk_users: int = 4096) -> np.ndarray:
    """(users, dim) served sequence vectors, chunk_users histories at a time: the histories' item vectors are
    gathered per chunk (all users' at once would be ~users x history length x dim floats)."""
    out = np.zeros((len(history), unit_vectors.shape[1]), dtype=np.float32)
    for start in progress(range(0, len(history), chunk_users), desc="bundle: sequence vectors", unit="chunk"):
        part = history[start:start + chunk_users]
        out[start:start + len(part)] = bundle.sequence_model.vectors([unit_vectors[h] for h in part])
    return out


async def _recommend_all(bundle: LoadedBundle, data: Interactions, examples, users, k: int, convert) -> list:
    """convert(each response), one request at a time, in the examples' order."""
    manifest = bundle.manifest
    encoder = AsyncEncoder(bundle.encoder, manifest.max_user_tokens, manifest.max_item_tokens)
    # the encoder's path for every request: this row is the full path (experiments/fast_path.py measures the fast one)
    recommender = Recommender(bundle, encoder, Limits(max_k=k, max_request_history=10_000), encoder_path="always")
    results = []
    try:
        for example, user in progress(list(zip(examples, users)), desc="bundle: server requests", unit="request"):
            history = tuple(HistoryRef(item_id=data.item_ids[i]) for i in data.sequences[example.user][: example.target_position])
            query = RecommendQuery(user=UserInput(history=history, context=user.context), k=k)
            results.append(convert(await recommender.recommend(query)))
    finally:
        encoder.close()
    return results
