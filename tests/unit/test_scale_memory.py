"""Memory after training does not grow with the number of users: calibration (finish_run), evaluation and the
sequence model's validation score users in bounded chunks, never a users x items matrix for all users."""

from __future__ import annotations

import numpy as np
import torch

from experiments.synthetic import SyntheticConfig, write_dataset
from llmrec.scoring import ScoreTerms
from llmrec.training import sequence_model as sequence_module
from llmrec.training import calibration as calibration_module
from llmrec.training import train as train_module
from llmrec.training.calibration import CHUNK_USERS
from llmrec.training.config import TrainConfig
from llmrec.training.data import load_interactions, split_examples
from llmrec.training.evaluation import evaluate
from llmrec.training.sequence_model import SequenceModel, SequenceModelConfig, validation_ndcg

DIM = 8


def unit(rows: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class FakeModel:
    """What finish_run touches of a TextRecommender, without the encoder."""

    def __init__(self, items: int) -> None:
        self.item_bias = torch.zeros(items)
        self.saved = []

    def cpu(self):
        return self

    def item_vectors(self, text_vectors):
        return text_vectors

    def to(self, device):
        return self

    def save(self, root, item_ids, adjustments=None, cooccurrence=None, fast_adjustments=None, fast_user_map=None):
        self.saved.append(adjustments)


def test_finish_run_chooses_the_adjustments_chunk_by_chunk(tmp_path, monkeypatch):
    data = load_interactions(write_dataset(tmp_path / "data", SyntheticConfig(users=1300, items=100, seed=2)))
    valid = split_examples(data, "valid")
    assert len(valid) > 2 * CHUNK_USERS  # three chunks at least
    items = torch.as_tensor(unit(data.num_items, 0))
    monkeypatch.setattr(train_module, "catalogue_text_vectors", lambda model, data, config: items)
    monkeypatch.setattr(train_module, "fit_cold_start", lambda model, data, text_vectors, seed: None)
    monkeypatch.setattr(train_module, "train_sequence_model",
                        lambda *args: (SequenceModel(DIM, SequenceModelConfig(hidden=8, heads=2, layers=1)),
                                       {"epochs": 1, "seconds": 0.0}))
    monkeypatch.setattr(train_module, "save_sequence_model", lambda model, path: None)
    monkeypatch.setattr(train_module, "user_vectors", lambda model, data, examples, config, *a, **k:
                        unit(len(examples), 1))
    monkeypatch.setattr(train_module, "histories_sequence_vectors", lambda model, data, examples, vectors, *a, **k:
                        unit(len(examples), 2))
    monkeypatch.setattr(train_module, "evaluate_against_baselines", lambda *args: {"evaluation": {}})
    shapes = []
    original = ScoreTerms.of

    class SpiedTerms(ScoreTerms):
        @classmethod
        def of(cls, rule, model, unit_vectors, histories, *args, **kwargs):
            shapes.append((np.shape(model), len(histories)))
            return original(rule, model, unit_vectors, histories, *args, **kwargs)

    monkeypatch.setattr(calibration_module, "ScoreTerms", SpiedTerms)
    model = FakeModel(data.num_items)
    metrics = train_module.finish_run(model, data, TrainConfig(), tmp_path / "run", tmp_path, {"steps": 1})

    assert shapes, "finish_run did not score any chunk"
    assert max(rows for (rows, _), _ in shapes) <= CHUNK_USERS  # never all users at once
    assert all(columns == data.num_items and users == rows for (rows, columns), users in shapes)
    chunks = -(-len(valid) // CHUNK_USERS)
    # every pass of the searches (the full path's stages, then the fast path's per bias weight) scores every chunk
    assert len(shapes) >= 2 * chunks and len(shapes) % chunks == 0
    assert sum(users for _, users in shapes[:chunks]) == len(valid)
    assert model.saved[-1] is not None and metrics["adjustments"] == vars(model.saved[-1])


def test_evaluate_asks_for_bounded_batches_whatever_the_number_of_users(tmp_path):
    data = load_interactions(write_dataset(tmp_path / "data", SyntheticConfig(users=700, items=100, seed=5)))
    examples = split_examples(data, "test")
    batches = []

    def scores(batch):
        batches.append(len(batch))
        return np.random.default_rng(len(batches)).random((len(batch), data.num_items))

    evaluate(scores, data, examples, (10,), batch_size=256)
    assert max(batches) <= 256 and sum(batches) == len(examples) == 700


def test_the_sequence_model_is_validated_in_chunks_with_the_same_result(monkeypatch):
    torch.manual_seed(0)
    model = SequenceModel(DIM, SequenceModelConfig(max_items=5, hidden=8, heads=2, layers=1, dropout=0.0)).eval()
    items = unit(60, 3)
    rng = np.random.default_rng(4)
    histories = [list(rng.integers(0, 60, rng.integers(1, 6))) for _ in range(1100)]
    targets = rng.integers(0, 60, 1100)
    bias = rng.normal(size=60).astype(np.float32)
    whole = validation_ndcg(model, histories, targets, items, bias, 0.05, chunk_users=len(histories))
    asked = []
    original = sequence_module.sequence_vectors
    monkeypatch.setattr(sequence_module, "sequence_vectors",
                        lambda model, part, vectors: asked.append(len(part)) or original(model, part, vectors))
    assert validation_ndcg(model, histories, targets, items, bias, 0.05, chunk_users=300) == whole
    assert max(asked) <= 300 and sum(asked) == 1100
