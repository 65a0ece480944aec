"""Quality of a served bundle: the INT8 encoder with exact search, and INT8 + HNSW through the server's code."""

from __future__ import annotations

import asyncio
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
from llmrec.training.evaluation import evaluate
from llmrec.training.calibration import histories

_UNRANKED = -1e9  # score for items HNSW did not return: below every returned one


def evaluate_bundle(
    bundle_dir: Path, data: Interactions, examples: Sequence[Example], use_context: bool, ks: Sequence[int] = (10, 50)
) -> dict[str, dict]:
    """{"int8_exact": metrics, "int8_hnsw_server": metrics} on the given examples.

    Users are encoded one request at a time, as the server encodes them (dynamic INT8 depends on the batch).
    The server path ranks only its top max(ks) items; a target below that counts as a miss, as it would in
    production.
    """
    bundle = LoadedBundle.load(bundle_dir, prefer_gpu=False, min_ef=max(ks))
    manifest = bundle.manifest
    columns = np.array([bundle.row_of[item_id] for item_id in data.item_ids])  # data item -> bundle row
    vectors = np.asarray(bundle.vectors)[columns]
    users = [user_text(data, e, use_context) for e in examples]
    user_vectors = np.vstack(
        [bundle.encoder.encode([render_user(u, manifest.max_history_items)], manifest.max_user_tokens) for u in users]
    )
    row_to_item = {row: i for i, row in enumerate(columns)}
    data_item_of_row = np.full(len(bundle.item_ids), -1, dtype=np.int64)
    data_item_of_row[columns] = np.arange(len(columns))
    rule = manifest.scoring_rule()
    cooccurrence = bundle.cooccurrence.renumber(data_item_of_row, data.num_items)
    unit_vectors = vectors[:, : manifest.dimension]
    history = histories(data, examples)
    sequence_vectors = bundle.sequence_model.vectors([unit_vectors[h] for h in history]) \
        if rule.adjustments.sequence_weight else None
    served = [[row_to_item[bundle.row_of[item.item_id]] for item in items]
              for items in asyncio.run(_recommend_all(bundle, data, examples, users, max(ks)))]
    by_position = {id(e): n for n, e in enumerate(examples)}

    def exact(batch: Sequence[Example]) -> np.ndarray:
        rows = [by_position[id(e)] for e in batch]
        return rule.dense_scores(user_vectors[rows], vectors, [history[r] for r in rows], cooccurrence,
                                 None if sequence_vectors is None else sequence_vectors[rows])

    def server_ranks(batch: Sequence[Example]) -> np.ndarray:
        scores = np.full((len(batch), data.num_items), _UNRANKED)
        for n, e in enumerate(batch):
            ranked = served[by_position[id(e)]]
            scores[n, ranked] = -np.arange(1, len(ranked) + 1)
        return scores

    return {"int8_exact": evaluate(exact, data, examples, ks),
            "int8_hnsw_server": evaluate(server_ranks, data, examples, ks)}


async def _recommend_all(bundle: LoadedBundle, data: Interactions, examples, users, k: int) -> list:
    manifest = bundle.manifest
    encoder = AsyncEncoder(bundle.encoder, manifest.max_user_tokens, manifest.max_item_tokens)
    recommender = Recommender(bundle, encoder, Limits(max_k=k, max_request_history=10_000))
    results = []
    try:
        for example, user in zip(examples, users):
            history = tuple(HistoryRef(item_id=data.item_ids[i]) for i in data.sequences[example.user][: example.target_position])
            query = RecommendQuery(user=UserInput(history=history, context=user.context), k=k)
            results.append(await recommender.recommend(query))
    finally:
        encoder.close()
    return results
