"""The checkpoint is saved as soon as the text model is trained, and a later run with the same training settings
on the same data resumes from it (finishing again, not training), as `make eval` keeps a trained text model when
only finishing settings differ."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llmrec.template import ItemFields
from llmrec.training import train as train_module
from llmrec.training.checkpoint import CheckpointLayout
from llmrec.training.config import TrainConfig
from llmrec.training.data import Interactions

TRAINED = TrainConfig(max_steps=7)
TRAINING = {"steps": 7, "train_seconds": 1.5, "curve": [{"step": 7, "loss": 1.0, "seconds": 1.5}]}


def interactions(last_item: int = 3) -> Interactions:
    return Interactions("tiny", ["a", "b", "c", "d"], [ItemFields(t) for t in "abcd"], ["u0", "u1"],
                        [[0, 1, 2, last_item], [1, 2, 3, 0]])


class FakeModel:
    """What save_text_model touches: save() writes the files a checkpoint holds."""

    item_bias = torch.zeros(4)

    def cpu(self):
        return self

    def to(self, device):
        return self

    def eval(self):
        return self

    def save(self, root, item_ids, adjustments=None, cooccurrence=None):
        layout = CheckpointLayout(root)
        layout.encoder.mkdir(parents=True, exist_ok=True)
        layout.item_head.write_text("calibrated" if adjustments is not None else "not calibrated")


@pytest.fixture
def saved(tmp_path):
    """A run directory holding a text model trained with TRAINED on interactions()."""
    train_module.save_text_model(FakeModel(), interactions(), TRAINED, tmp_path, tmp_path / "encoder", TRAINING)
    return tmp_path


def test_the_text_model_is_saved_uncalibrated_with_its_training_record(saved):
    checkpoint = CheckpointLayout.of_run(saved)
    assert checkpoint.item_head.read_text() == "not calibrated"
    assert TrainConfig.load(checkpoint.config) == TRAINED
    record = json.loads(checkpoint.training.read_text())
    assert record["config"] == TRAINED.training_fields() and record["training"] == TRAINING
    assert not checkpoint.training.with_suffix(".json.tmp").exists()


@pytest.mark.parametrize("finishing", [{}, {"eval_users": 100}, {"calibration_users": 3000}, {"ks": (5, 20)}])
def test_the_same_training_settings_resume_whatever_the_finishing_ones(saved, finishing):
    config = dataclasses.replace(TRAINED, **finishing)
    assert train_module.trained_text_model(saved, interactions(), config, saved / "encoder") == TRAINING


@pytest.mark.parametrize("change", [{"max_steps": 8}, {"seed": 1}, {"temperature": 0.07}])
def test_other_training_settings_do_not_resume(saved, change):
    assert train_module.trained_text_model(saved, interactions(), dataclasses.replace(TRAINED, **change),
                                           saved / "encoder") is None


def test_other_data_or_another_encoder_do_not_resume(saved):
    assert train_module.trained_text_model(saved, interactions(last_item=1), TRAINED, saved / "encoder") is None
    assert train_module.trained_text_model(saved, interactions(), TRAINED, saved / "other-encoder") is None


def test_a_checkpoint_without_its_record_is_not_resumed(saved):
    CheckpointLayout.of_run(saved).training.unlink()  # e.g. killed while saving
    assert train_module.trained_text_model(saved, interactions(), TRAINED, saved / "encoder") is None


@pytest.fixture
def calls(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(train_module, "train_text_model",
                        lambda *args: calls.append("train") or (FakeModel(), TRAINING))
    monkeypatch.setattr(train_module, "finish_run",
                        lambda model, data, config, out, encoder, training, *rest: calls.append(("finish", training))
                        or {"steps": training["steps"]})
    monkeypatch.setattr(train_module.TextRecommender, "from_checkpoint",
                        staticmethod(lambda path: calls.append("load") or FakeModel()))
    return calls


def test_train_resumes_a_trained_text_model_and_only_finishes_it(saved, calls):
    train_module.train(interactions(), dataclasses.replace(TRAINED, eval_users=1), saved, saved / "encoder")
    assert calls == ["load", ("finish", TRAINING)]


def test_train_trains_when_asked_to_or_when_nothing_matches(saved, calls):
    train_module.train(interactions(), TRAINED, saved, saved / "encoder", resume=False)
    train_module.train(interactions(), dataclasses.replace(TRAINED, seed=3), saved, saved / "encoder")
    assert calls == ["train", ("finish", TRAINING), "train", ("finish", TRAINING)]


def test_a_model_saved_before_its_adjustments_reads_as_not_calibrated(tmp_path):
    from llmrec.scoring import Adjustments
    from llmrec.training.model import TextRecommender, load_item_head, pretrained_encoder_path

    model = TextRecommender(pretrained_encoder_path(), 3)
    model.save(tmp_path / "trained", ["a", "b", "c"], adjustments=None)
    model.save(tmp_path / "finished", ["a", "b", "c"], Adjustments(history_item_score=-0.5))
    assert not load_item_head(tmp_path / "trained").calibrated  # export warns and keeps them off
    finished = load_item_head(tmp_path / "finished")
    assert finished.calibrated and finished.adjustments.history_item_score == -0.5
