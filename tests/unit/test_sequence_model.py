"""The sequence model over item vectors (training/sequence_model.py) and its served ONNX form
(llmrec.sequence_runner): padding-invariant, equal in PyTorch and ONNX Runtime, and it learns an order."""

from __future__ import annotations

import numpy as np
import torch

from llmrec.export.onnx import export_sequence_model
from llmrec.sequence_runner import SequenceRunner
from llmrec.template import ItemFields
from llmrec.training.data import Interactions, split_examples
from llmrec.training.evaluation import ranking_metrics, target_ranks
from llmrec.training.sequence_model import (
    SequenceModel, SequenceModelConfig, load_sequence_model, save_sequence_model, sequence_vectors,
    train_sequence_model,
)

DIM = 16
SMALL = SequenceModelConfig(max_items=6, hidden=32, heads=2, layers=2, dropout=0.0)


def unit_vectors(count: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_history_scores_the_same_alone_or_padded_in_a_batch():
    torch.manual_seed(0)
    model = SequenceModel(DIM, SMALL).eval()
    items = unit_vectors(30)
    histories = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], []]  # the second runs past max_items
    together = sequence_vectors(model, histories, items)
    alone = np.vstack([sequence_vectors(model, [h], items) for h in histories])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(together[1], sequence_vectors(model, [histories[1][-SMALL.max_items:]], items)[0],
                               atol=1e-5)
    assert not together[3].any()  # an empty history adds nothing
    assert np.abs(together[0] - together[2]).max() > 1e-3  # different histories, different vectors


def test_the_onnx_runner_equals_pytorch(tmp_path):
    torch.manual_seed(1)
    model = SequenceModel(DIM, SMALL).eval()
    items = unit_vectors(30, seed=1)
    histories = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], []]
    runner = SequenceRunner(export_sequence_model(model, tmp_path / "sequence.onnx"), SMALL.max_items)
    served = runner.vectors([items[h] for h in histories])
    np.testing.assert_allclose(served, sequence_vectors(model, histories, items), atol=1e-5)
    save_sequence_model(model, tmp_path / "sequence.pt")
    reloaded = load_sequence_model(tmp_path / "sequence.pt")
    np.testing.assert_allclose(sequence_vectors(reloaded, histories, items), served, atol=1e-5)
    assert load_sequence_model(tmp_path / "absent.pt") is None


def test_it_learns_what_comes_next_from_the_order_of_a_history():
    # 40 items in a cycle; every user walks it from a random start. Item vectors are random, so only the order
    # of a history says what comes next: the previous item alone, or any bag of the history, cannot.
    items = 40
    rng = np.random.default_rng(0)
    sequences = [[(start + step) % items for step in range(8)] for start in rng.integers(0, items, 200)]
    data = Interactions("cycle", [str(i) for i in range(items)], [ItemFields(f"t{i}") for i in range(items)],
                        [str(u) for u in range(len(sequences))], sequences)
    vectors = unit_vectors(items, seed=2)
    config = SequenceModelConfig(max_items=6, hidden=32, heads=2, layers=1, dropout=0.0, batch_size=32, lr=3e-3,
                                 max_epochs=20, eval_every_steps=30, patience=100, time_budget_minutes=1.0)
    model, info = train_sequence_model(data, vectors, np.zeros(items, np.float32), 0.05, config)
    valid = split_examples(data, "valid")
    scores = sequence_vectors(model, [data.sequences[e.user][: e.target_position] for e in valid], vectors) @ vectors.T
    targets = np.array([data.sequences[e.user][e.target_position] for e in valid])
    assert ranking_metrics(target_ranks(scores, targets), (1,))["recall@1"] > 0.9
    assert info["valid_ndcg@10"] > 0.9 and info["epochs"] <= 20
