"""`make eval` in miniature: every row of the report computed in one run on the tiny data set."""

import json
from pathlib import Path

import pytest

from experiments.baselines.sasrec import SASRecConfig
from llmrec.training.config import TrainConfig
from llmrec.training.ranking_stage import CANDIDATES, WEIGHTS, RankerConfig
from llmrec.training.sequence_model import SequenceModelConfig
from experiments.experiment import run_experiment
from llmrec.training.calibration import (
    COOCCURRENCE_WEIGHT_GRID, HISTORY_SCORE_GRID, HISTORY_VECTOR_WEIGHT_GRID, SEQUENCE_WEIGHT_GRID,
)

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"


def test_experiment_reports_every_model_side_by_side(tmp_path):
    config = TrainConfig(max_steps=2, batch_size=8)
    # the small models are bounded by epochs, never by a clock
    sasrec, sequence = SASRecConfig(max_epochs=2, eval_every=1), SequenceModelConfig(max_epochs=3)
    summary = run_experiment(TINY, tmp_path / "runs" / "tiny", tmp_path / "bundles", tmp_path / "report", 2, config,
                             sasrec, sequence)
    policies = summary["policies"]
    every_row = ["popularity", "sasrec", "cooccurrence_only", "zero_shot", "text_model", "sequence_model_alone",
                 "no_lm_hybrid", "llmrec", "llmrec_without_context", "int8_exact", "int8_hnsw_server"]
    assert list(policies) == ["published", "deployed"] and list(policies["deployed"]) == every_row
    # the served path applies the bundle's history item score: it has no published row, and says why
    assert list(policies["published"]) == every_row[:-1]
    assert "int8_hnsw_server" in summary["not_evaluated"]["published"]
    rows = policies["deployed"]
    # 42 items: HNSW is exact here, so the server path must reproduce INT8 exact search.
    assert rows["int8_hnsw_server"]["ndcg@10"] == rows["int8_exact"]["ndcg@10"]
    assert abs(summary["int8_hnsw_relative_ndcg10_loss"]) < 0.2
    # every row is evaluated on the same users
    assert {row["examples"] for policy in policies.values() for row in policy.values()} == {rows["llmrec"]["examples"]}
    # Each row's deployed history item score comes from the calibration grid; published rows have none.
    assert set(summary["history_scores"]) >= set(every_row[:-4])
    for name, chosen in summary["history_scores"].items():
        assert all(seed["history_item_score"] in HISTORY_SCORE_GRID for seed in chosen), name
    # The no-LM hybrid's weights are chosen on validation by the same calibration grid, SASRec's by epochs.
    for seed in summary["no_lm_hybrid"]:
        assert seed["weights"]["history_item_score"] in HISTORY_SCORE_GRID
        assert seed["weights"]["cooccurrence_weight"] in COOCCURRENCE_WEIGHT_GRID and seed["weights"]["scale"] > 0
        assert seed["sasrec"]["epochs"] <= 2 and seed["sasrec"]["stopped"] in ("converged", "max_epochs")
    # The language model's contribution: ours minus the hybrid, with a paired interval, per seed and averaged.
    contribution = summary["contribution"]
    assert [(c["system"], c["policy"]) for c in contribution] == [
        ("int8_hnsw_server", "deployed"), ("llmrec", "deployed"), ("llmrec", "published")]
    for entry in contribution:
        assert len(entry["per_seed"]) == 2
        for result in [entry["seed_averaged"], *entry["per_seed"]]:
            for metric in ("ndcg@10", "recall@10"):
                assert result[metric]["low"] <= result[metric]["mean"] <= result[metric]["high"]
                assert 0 < result[metric]["p_value"] <= 1 and result[metric]["users"] == rows["llmrec"]["examples"]
    served = contribution[0]["seed_averaged"]["ndcg@10"]
    assert served["mean"] == pytest.approx(rows["int8_hnsw_server"]["ndcg@10"] - rows["no_lm_hybrid"]["ndcg@10"])
    # Two seeds: the seeded rows carry a spread; popularity, zero-shot and co-occurrence alone are evaluated once.
    assert len(summary["per_seed"]) == 2 and summary["steps"] == [2, 2]
    assert set(summary["spread"]["deployed"]) == set(summary["per_seed"][0]["deployed"])
    assert {"llmrec", "sasrec", "no_lm_hybrid"} <= set(summary["spread"]["deployed"])
    assert not {"popularity", "zero_shot", "cooccurrence_only"} & set(summary["spread"]["deployed"])
    seed1 = json.loads((tmp_path / "runs" / "tiny-seed1" / "metrics.json").read_text())
    assert "llmrec" in seed1["evaluation"] and "zero_shot" not in seed1["evaluation"]
    report = (tmp_path / "report" / "report.md").read_text()
    for heading in ("## Published policy", "## Deployed policy", "## Language model contribution"):
        assert heading in report
    assert "| sasrec |" in report and "| no_lm_hybrid |" in report and "| int8_hnsw_server | n/a |" in report
    assert 'cooccurrence_before(data, "test")' in report and "No-LM hybrid (seed 0):" in report
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
    assert not summary["ranking_stage"] and "## Ranking stage" not in report  # not asked for
    # A second run with the same config reuses the trained seed instead of training again; asked for the ranking
    # stage, it trains one (weight chosen on the calibration users), ships it in the bundle and reports it.
    ranking = RankerConfig(max_steps=2, lists_per_step=1, negatives=3)
    again = run_experiment(TINY, tmp_path / "runs" / "tiny", tmp_path / "bundles", tmp_path / "report2", 1, config,
                           sasrec, sequence, ranking)
    assert again["curve"] == summary["curve"] and again["train_devices"] == summary["train_devices"][:1]
    [stage] = again["ranking_stage"]
    assert stage["chosen_on_validation"]["weight"] in WEIGHTS and stage["chosen_on_validation"]["candidates"] in CANDIDATES
    assert stage["users"] == rows["llmrec"]["examples"]
    first, int8 = stage["rows"]["first_stage"], stage["rows"]["ranking_stage_int8"]
    assert stage["vs_first_stage"]["ranking_stage_int8"]["ndcg@10"]["mean"] == pytest.approx(
        int8["ndcg@10"] - first["ndcg@10"])
    assert stage["stage_ms"]["p50"] > 0 and stage["served_c1"]["requests_each"] > 0
    manifest = json.loads(max((tmp_path / "bundles" / "seed0").glob("*/manifest.json"),
                              key=lambda path: path.parent.name).read_text())
    assert manifest["ranking_stage"]["weight"] == stage["chosen_on_validation"]["weight"]
    staged_report = (tmp_path / "report2" / "report.md").read_text()
    assert "## Ranking stage" in staged_report and (tmp_path / "report2" / "ranking-stage" / "seed0" / "report.md").is_file()
