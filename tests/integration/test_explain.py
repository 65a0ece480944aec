"""Explanations through the real server, and the faithfulness measurement script against it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import explain_eval
from llmrec.v1 import recommender_pb2 as pb
from tests.conftest import FIXTURES

HISTORY = ["m1", "m27", "m13"]  # Star Wars, Titanic, Groundhog Day


def history(*ids: str) -> list[pb.HistoryItem]:
    return [pb.HistoryItem(item_id=i) for i in ids]


def unit_row(stub, item_id: str) -> np.ndarray:
    row = np.array(stub.GetItem(pb.GetItemRequest(item_id=item_id, include_vector=True), timeout=10).vector.values)
    return row[:-1]


def test_every_item_is_explained_by_its_most_similar_history_items(stub):
    response = stub.Recommend(pb.RecommendRequest(history=history(*HISTORY), k=8, explain=True,
                                                  exclude_history=True), timeout=10)
    plain = stub.Recommend(pb.RecommendRequest(history=history(*HISTORY), k=8, exclude_history=True), timeout=10)
    assert [i.item_id for i in response.items] == [i.item_id for i in plain.items]  # explaining changes nothing
    assert not any(i.HasField("explanation") for i in plain.items)
    titles = {"m1": "Star Wars (1977)", "m27": "Titanic (1997)", "m13": "Groundhog Day (1993)"}
    history_rows = {i: unit_row(stub, i) for i in HISTORY}
    for item in response.items:
        reasons = item.explanation.reasons
        assert reasons and all(r.kind == pb.Reason.HISTORY_ITEM for r in reasons)
        assert all(0 < r.weight <= 1 for r in reasons) and sum(r.weight for r in reasons) == pytest.approx(1, abs=1e-5)
        assert [r.weight for r in reasons] == sorted((r.weight for r in reasons), reverse=True)
        similarity = {i: float(unit_row(stub, item.item_id) @ v) for i, v in history_rows.items()}
        assert reasons[0].item_id == max(similarity, key=similarity.get)
        assert reasons[0].similarity == pytest.approx(similarity[reasons[0].item_id], abs=1e-4)
        assert reasons[0].text == titles[reasons[0].item_id]
        assert item.explanation.summary.startswith(f"Because you liked {reasons[0].text}")
    top_sources = {i.explanation.reasons[0].item_id for i in response.items}
    assert len(top_sources) >= 2  # different items, different reasons


def test_query_terms_and_text_history_items_are_explained(stub):
    response = stub.Recommend(pb.RecommendRequest(
        history=[pb.HistoryItem(text=pb.ItemText(title="Gravity (2013)", categories=["Space"]))],
        context=pb.Context(query="romantic comedy"), k=5, explain=True), timeout=10)
    for item in response.items:
        kinds = {r.kind for r in item.explanation.reasons}
        assert kinds <= {pb.Reason.HISTORY_ITEM, pb.Reason.QUERY_TERM}
        texts = {r.text for r in item.explanation.reasons}
        assert texts & {"romantic", "comedy"} and "Gravity (2013)" in texts
        assert all(r.item_id == "" for r in item.explanation.reasons)  # text items and terms have no id
    romance = next(i for i in response.items if i.item_id in {"m28", "m29", "m30"})
    assert 'asked for "romantic comedy"' in romance.explanation.summary
    stream = list(stub.RecommendStream(pb.RecommendRequest(context=pb.Context(query="space"), k=4, page_size=2,
                                                           explain=True), timeout=10))
    assert all(i.explanation.summary == 'Because you asked for "space"' for page in stream for i in page.items)


def test_faithfulness_script_on_the_tiny_catalogue(server, tmp_path):
    """clients/explain_eval.py through gRPC: removing the top-attributed item hurts more than a random one."""
    out = tmp_path / "explain.json"
    interactions = FIXTURES / "tiny" / "interactions.csv"
    report = explain_eval.main(["--target", server.target, "--interactions", str(interactions), "--users", "12",
                                "--k", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["users"] == 12 and report["pairs"] == 48
    assert report["max_recommend_vs_embed_score_gap"] < 1e-4  # the script scores exactly as the server ranks
    assert report["faithfulness_rate"] > 0.6
    assert report["mean_top_drop"] > report["mean_random_drop"]
