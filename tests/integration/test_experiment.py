"""`make eval` in miniature: every row of the report computed in one run on the tiny data set."""

import json
from pathlib import Path

from experiments.baselines.sasrec import SASRecConfig
from llmrec.training.config import TrainConfig
from experiments.experiment import run_experiment
from llmrec.training.calibration import (
    COOCCURRENCE_WEIGHT_GRID, HISTORY_SCORE_GRID, HISTORY_VECTOR_WEIGHT_GRID, SEQUENCE_WEIGHT_GRID,
)

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"


def test_experiment_reports_every_model_side_by_side(tmp_path):
    config = TrainConfig(max_steps=2, batch_size=8)
    summary = run_experiment(TINY, tmp_path / "runs" / "tiny", tmp_path / "bundles", tmp_path / "report", 2, config,
                             SASRecConfig(time_budget_minutes=0.01, eval_every=1))
    rows = summary["evaluation"]
    assert list(rows) == ["popularity", "zero_shot", "sasrec", "cooccurrence_only", "sequence_model_alone", "llmrec",
                          "llmrec_without_context", "int8_exact", "int8_hnsw_server"]
    # 42 items: HNSW is exact here, so the server path must reproduce INT8 exact search.
    assert rows["int8_hnsw_server"]["ndcg@10"] == rows["int8_exact"]["ndcg@10"]
    assert abs(summary["int8_hnsw_relative_ndcg10_loss"]) < 0.2
    # Two seeds: our model's rows carry a spread; popularity and zero-shot are evaluated with seed 0 alone.
    assert len(summary["per_seed"]) == 2 and summary["steps"] == [2, 2]
    assert set(summary["spread"]) == set(summary["per_seed"][0]) and "llmrec" in summary["spread"]
    assert "popularity" not in summary["spread"] and "zero_shot" not in summary["spread"]
    seed1 = json.loads((tmp_path / "runs" / "tiny-seed1" / "metrics.json").read_text())
    assert "llmrec" in seed1["evaluation"] and "zero_shot" not in seed1["evaluation"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| sasrec |" in report and "| int8_hnsw_server |" in report
    # The adjustments chosen on validation travel to the bundle, and the server path applies them
    # (the INT8 exact row above adds them in numpy; the HNSW row goes through server.recommender).
    chosen = summary["adjustments"][0]["chosen"]
    assert chosen["history_item_score"] in HISTORY_SCORE_GRID and "history item score" in report
    assert chosen["cooccurrence_weight"] in COOCCURRENCE_WEIGHT_GRID and "co-occurrence weight" in report
    assert chosen["history_vector_weight"] in HISTORY_VECTOR_WEIGHT_GRID and "history vector weight" in report
    manifest = json.loads(next((tmp_path / "bundles" / "seed0").glob("*/manifest.json")).read_text())
    assert manifest["history_item_score"] == chosen["history_item_score"]
    assert manifest["cooccurrence"]["weight"] == chosen["cooccurrence_weight"]
    assert manifest["history_vector"]["weight"] == chosen["history_vector_weight"]
    assert chosen["sequence_weight"] in SEQUENCE_WEIGHT_GRID and "sequence model weight" in report
    assert manifest["sequence_model"]["weight"] == chosen["sequence_weight"]
    assert (next((tmp_path / "bundles" / "seed0").glob("*/model/sequence_model.onnx"))).stat().st_size > 0
    assert summary["sequence_model_seconds"][0] > 0 and "then the sequence model in" in report
    assert summary["train_devices"][0] and f"s on {summary['train_devices'][0]}, then" in report
    for png in ("training_curve.png", "metrics.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "report" / "report.json").read_text())["dataset"] == "tiny"
    # A second run with the same config reuses the trained seed instead of training again.
    again = run_experiment(TINY, tmp_path / "runs" / "tiny", tmp_path / "bundles", tmp_path / "report2", 2, config,
                           SASRecConfig(time_budget_minutes=0.01, eval_every=1))
    assert again["curve"] == summary["curve"] and again["train_devices"] == summary["train_devices"]
