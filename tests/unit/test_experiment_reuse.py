"""`make eval` keeps a trained text model when only how it is finished (adjustments, evaluation) changed."""

import dataclasses
import json

import pytest

from experiments import experiment
from llmrec.training.calibration import calibration_search
from llmrec.training.config import TrainConfig
from llmrec.training.sequence_model import SequenceModelConfig
from llmrec.training.train import EVALUATION_PROTOCOL

TRAINED = TrainConfig(max_steps=7)


@pytest.fixture
def calls(tmp_path, monkeypatch) -> list:
    """A run trained with TRAINED and finished with today's search; train and finish_run record their calls."""
    metrics = {"config": json.loads(json.dumps(dataclasses.asdict(TRAINED))), "calibration_search": calibration_search(),
               "sequence_model": {"config": dataclasses.asdict(SequenceModelConfig())},
               "train_seconds": 12.5, "steps": 7, "curve": [{"step": 7, "loss": 1.0, "seconds": 12.5}],
               "evaluation_protocol": EVALUATION_PROTOCOL}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    calls = []
    monkeypatch.setattr(experiment, "train", lambda *args, **kwargs: calls.append("train") or {})
    monkeypatch.setattr(experiment, "finish_run",
                        lambda model, data, config, out, encoder, training, *rest: calls.append(("finish", training))
                        or {})
    monkeypatch.setattr(experiment.TextRecommender, "from_checkpoint", staticmethod(lambda path: "model"))
    monkeypatch.setattr(experiment, "pretrained_encoder_path", lambda: "encoder")
    return calls


@pytest.fixture
def reuse(tmp_path, calls):
    """_train_or_reuse on the run: the calls it made to train and finish_run."""
    def run(config, sequence=SequenceModelConfig()):
        experiment._train_or_reuse(None, config, sequence, tmp_path, model_free_baselines=True)
        return calls
    return run


def test_the_exact_config_is_reused_as_it_is(reuse):
    assert reuse(TRAINED) == []


@pytest.mark.parametrize("change", [{"calibration_users": 3000}, {"eval_users": 100}, {"ks": (5, 20)}])
def test_other_finishing_settings_keep_the_text_model_and_finish_again(reuse, change):
    calls = reuse(dataclasses.replace(TRAINED, **change))
    assert calls == [("finish", {"train_seconds": 12.5, "steps": 7,
                                 "curve": [{"step": 7, "loss": 1.0, "seconds": 12.5}]})]


def test_another_sequence_model_finishes_again(reuse):
    assert [call[0] for call in reuse(TRAINED, SequenceModelConfig(seed=5))] == ["finish"]


def test_a_run_evaluated_under_another_protocol_finishes_again(tmp_path, reuse):
    # e.g. one evaluated before both history policies and the per-user ranks existed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    del metrics["evaluation_protocol"]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert [call[0] for call in reuse(TRAINED)] == ["finish"]


@pytest.mark.parametrize("change", [{"max_steps": 8}, {"seed": 1}, {"temperature": 0.07}])
def test_other_training_settings_train_again(reuse, change):
    assert reuse(dataclasses.replace(TRAINED, **change)) == ["train"]
