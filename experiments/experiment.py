"""`make eval`: train (per seed), export, and evaluate every row side by side in one run, then report.

One protocol for every row: leave-one-out, full ranking over all items, the same test users, and one co-occurrence
table (calibration.cooccurrence_before(data, "test")) for every row that uses one; two history policies side by
side (calibration.POLICIES): "published" ranks a user's history items like any other item, "deployed" gives each
row the history item score chosen for it on validation users.

Rows: popularity, SASRec (ID baseline, full softmax, trained to convergence), co-occurrence alone (no model), the
zero-shot encoder, our text model alone (no adjustments), the sequence model over item vectors alone, the no-LM
hybrid (SASRec + co-occurrence + history item score, experiments/baselines/no_lm.py), llmrec in PyTorch FP32 with
exact search, the exported INT8 model with exact search, and INT8 + HNSW through the server's own code path
(deployed only: the server applies the manifest's history item score). The language model's contribution is ours
minus the no-LM hybrid, paired over the same test users (experiments/significance.py). With --ranking-stage-steps,
each seed also trains the ranking stage (training/ranking_stage.py: its weight chosen on our calibration users),
exports it in the bundle, and reports its gain and cost on the same test users (experiments/ranking_stage.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import typer

from llmrec.cooccurrence import CooccurrenceTable
from llmrec.export.bundle import build_bundle
from experiments.evaluate_bundle import evaluate_bundle
from experiments.baselines.no_lm import evaluate_without_language_model
from experiments.baselines.sasrec import SASRecConfig
from experiments.significance import compare
from llmrec.training.calibration import (
    POLICIES, calibration_search, cooccurrence_before, cooccurrence_only_scores, evaluate_policies,
)
from llmrec.training.checkpoint import checkpoint_dir
from llmrec.training.cli_options import FROZEN_LAYERS, HISTORY_DROPOUT, configure_logging
from llmrec.training.config import TrainConfig
from llmrec.training.data import Example, Interactions, load_interactions, split_examples, user_text
from experiments import ranking_stage as ranking_stage_report
from experiments.report import write_report
from llmrec.training.model import TextRecommender, pretrained_encoder_path
from llmrec.training.ranking_stage import RANKER_DIR, RANKER_SETTINGS_FILE, RankerConfig, train_and_choose
from llmrec.training.sequence_model import SequenceModelConfig
from llmrec.training.train import EVALUATION_PROTOCOL, finish_run, train

log = logging.getLogger("llmrec.experiment")

# Unlike the short demo of `make run`, an evaluation trains each seed for up to 80 minutes, so that a seed fits
# the 90 minutes a 2-core CPU machine may spend on it: ~4 epochs of Amazon Scientific.
EVAL_TIME_BUDGET_MINUTES = 80.0
EVAL_MAX_STEPS = 100_000
# rows that depend on neither the trained model nor its seed: evaluated once (popularity and zero-shot in seed 0's
# run, co-occurrence alone here)
MODEL_FREE_ROWS = ("popularity", "zero_shot")
ROWS = ("popularity", "sasrec", "cooccurrence_only", "zero_shot", "text_model", "sequence_model_alone",
        "no_lm_hybrid", "llmrec", "llmrec_without_context", "int8_exact", "int8_hnsw_server")
# the rows whose scores take the co-occurrence table (ours when its chosen weight is not 0)
ROWS_WITH_COOCCURRENCE = ("cooccurrence_only", "no_lm_hybrid", "llmrec", "llmrec_without_context", "int8_exact",
                          "int8_hnsw_server")
# (our row, policy): each is compared with the no-LM hybrid under the same policy
CONTRIBUTIONS = (("int8_hnsw_server", "deployed"), ("llmrec", "deployed"), ("llmrec", "published"))
SERVED_NOT_PUBLISHED = ("the server applies the bundle's own history item score; a bundle served with score 0 "
                        "would be another system than the one we deploy")
COOCCURRENCE_TABLE = ('cooccurrence_before(data, "test"): every event before the test targets (the training events '
                      'and the validation targets, which the test histories hold), as the bundle serves it; weights '
                      'are chosen on validation users with cooccurrence_before(data, "valid")')


def _as_json(value) -> object:
    return json.loads(json.dumps(value))


def _train_or_reuse(data, config: TrainConfig, sequence: SequenceModelConfig, run_dir: Path,
                    model_free_baselines: bool) -> dict:
    """A run directory whose metrics.json was made with exactly this config is reused (e.g. after `make train`);
    one that differs only in how it is finished (TrainConfig.FINISHING_FIELDS, the sequence model, the adjustments'
    search, the evaluation protocol) keeps its text model and is finished again (sequence model, adjustments,
    evaluation), not retrained."""
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        trained = {name: value for name, value in metrics["config"].items() if name not in config.FINISHING_FIELDS}
        if trained == config.training_fields():
            if (metrics["config"] == _as_json(dataclasses.asdict(config))
                    and metrics.get("calibration_search") == _as_json(calibration_search())
                    and metrics.get("sequence_model", {}).get("config") == _as_json(dataclasses.asdict(sequence))
                    and metrics.get("evaluation_protocol") == EVALUATION_PROTOCOL):
                log.info("reusing %s (trained and finished with this exact config)", run_dir)
                return metrics
            log.info("reusing the text model in %s (trained with these settings); finishing it again", run_dir)
            model = TextRecommender.from_checkpoint(checkpoint_dir(run_dir))
            training = {key: metrics[key] for key in ("world_size", "device", "bf16", "train_seconds", "steps", "curve")
                        if key in metrics}
            return finish_run(model, data, config, run_dir, pretrained_encoder_path(), training, sequence,
                              model_free_baselines)
    return train(data, config, run_dir, sequence_config=sequence, model_free_baselines=model_free_baselines)


def _ranker_or_reuse(data: Interactions, checkpoint: Path, ranking: RankerConfig, validation_users: int) -> dict:
    """The checkpoint's ranking stage if it was trained with exactly this config and chosen on as many validation
    users (e.g. by `make ranking-stage`), else one trained and chosen now (training/ranking_stage.py)."""
    settings = checkpoint / RANKER_DIR / RANKER_SETTINGS_FILE
    if settings.is_file():
        chosen = json.loads(settings.read_text())
        if (chosen["training"]["config"] == _as_json(dataclasses.asdict(ranking))
                and chosen["validation"]["users"] == validation_users):
            log.info("reusing the ranking stage in %s", settings.parent)
            return chosen
    return train_and_choose(data, checkpoint, ranking, validation_users)


def run_experiment(data_path: Path, run_root: Path, bundle_root: Path, report_dir: Path, seeds: int,
                   config: TrainConfig, sasrec: SASRecConfig,
                   sequence: SequenceModelConfig = SequenceModelConfig(), ranking: RankerConfig | None = None) -> dict:
    data = load_interactions(data_path)
    if config.eval_split != "test":
        raise ValueError("make eval reports the test split; tune on 'valid' with `make train`")
    test = split_examples(data, "test")[: config.eval_users or None]
    valid = split_examples(data, "valid")[: config.calibration_users or None]  # as our adjustments are chosen
    tables = {split: cooccurrence_before(data, split) for split in ("valid", "test")}
    cooccurrence_rows, _, cooccurrence_weights = evaluate_policies(
        cooccurrence_only_scores(data, tables["valid"]), cooccurrence_only_scores(data, tables["test"]), data, valid,
        test, config.ks)
    seeds_evaluated = [_evaluate_seed(data, dataclasses.replace(config, seed=seed),
                                      dataclasses.replace(sequence, seed=seed), dataclasses.replace(sasrec, seed=seed),
                                      run_root if seed == 0 else run_root.with_name(f"{run_root.name}-seed{seed}"),
                                      bundle_root / f"seed{seed}", valid, test, tables,
                                      None if ranking is None else dataclasses.replace(ranking, seed=seed),
                                      report_dir / "ranking-stage" / f"seed{seed}")
                       for seed in range(seeds)]
    summary = _summary(data, config, seeds_evaluated, cooccurrence_rows, cooccurrence_weights.as_json(),
                       tables["test"])
    write_report(summary, report_dir)
    return summary


def _summary(data: Interactions, config: TrainConfig, seeds_evaluated: list[dict], cooccurrence_rows: dict,
             cooccurrence_weights: dict, table: CooccurrenceTable) -> dict:
    """The report's content: every row by policy (mean over seeds, and spread), each row's history item scores,
    the co-occurrence table used, the no-LM hybrid, the language model's contribution and how each seed trained."""
    seeds = len(seeds_evaluated)
    per_seed = [evaluated["policies"] for evaluated in seeds_evaluated]
    seed_free = {policy: seeds_evaluated[0]["model_free"][policy] | {"cooccurrence_only": cooccurrence_rows[policy]}
                 for policy in POLICIES}
    policies = {policy: _ordered({name: _mean(per_seed, policy, name) for name in per_seed[0][policy]}
                                 | seed_free[policy]) for policy in POLICIES}
    history_scores = {"cooccurrence_only": [cooccurrence_weights]}  # each row's, one per seed
    for evaluated in seeds_evaluated:
        for name, chosen in evaluated["history_scores"].items():
            history_scores.setdefault(name, []).append(chosen)
    fp32, served = policies["deployed"]["llmrec"]["ndcg@10"], policies["deployed"]["int8_hnsw_server"]["ndcg@10"]
    return {
        "dataset": data.name,
        "seeds": seeds,
        "config": dataclasses.asdict(config),
        "policies": policies,
        "spread": {policy: {name: _std(per_seed, policy, name) for name in per_seed[0][policy]}
                   for policy in POLICIES} if seeds > 1 else {},
        "per_seed": per_seed,
        "not_evaluated": {"published": {"int8_hnsw_server": SERVED_NOT_PUBLISHED}},
        "history_scores": {name: history_scores[name] for name in ROWS if name in history_scores},
        "cooccurrence_table": {"table": COOCCURRENCE_TABLE, "pairs": int(len(table.neighbours)),
                               "rows": [name for name in ROWS_WITH_COOCCURRENCE if name in policies["deployed"]]},
        "no_lm_hybrid": [evaluated["no_lm"] for evaluated in seeds_evaluated],
        "contribution": language_model_contribution([evaluated["ranks"] for evaluated in seeds_evaluated]),
        "int8_hnsw_relative_ndcg10_loss": (fp32 - served) / fp32 if fp32 else None,
        "adjustments": [evaluated["adjustments"] for evaluated in seeds_evaluated],
        "train_seconds": [evaluated["run"]["train_seconds"] for evaluated in seeds_evaluated],  # the text model
        "train_devices": [evaluated["run"].get("device") for evaluated in seeds_evaluated],  # absent from old runs
        "sequence_model_seconds": [evaluated["run"]["sequence_model"]["seconds"] for evaluated in seeds_evaluated],
        "steps": [len(evaluated["run"]["curve"]) for evaluated in seeds_evaluated],
        "curve": seeds_evaluated[0]["run"]["curve"],
        "ranking_stage": [evaluated["ranking_stage"] for evaluated in seeds_evaluated if evaluated["ranking_stage"]],
    }


def _evaluate_seed(data: Interactions, config: TrainConfig, sequence: SequenceModelConfig, sasrec: SASRecConfig,
                   run_dir: Path, bundle_dir: Path, valid: list[Example], test: list[Example],
                   tables: dict, ranking: RankerConfig | None = None, ranking_report: Path | None = None) -> dict:
    """One seed's rows by policy (and the model-free rows of seed 0's run), the per-user test ranks of the rows
    CONTRIBUTIONS compares, each baseline's history item score, how the seed was trained and, with a ranking
    config, its ranking stage's report (written to ranking_report)."""
    seed = config.seed
    metrics = _train_or_reuse(data, config, sequence, run_dir, model_free_baselines=seed == 0)
    if ranking is not None:  # before the export, which ships it
        _ranker_or_reuse(data, checkpoint_dir(run_dir), ranking, len(valid))
    validation = [user_text(data, e, config.use_context) for e in split_examples(data, "valid")[:300]]
    bundle = build_bundle(
        checkpoint_dir(run_dir), list(zip(data.item_ids, data.items)), bundle_dir,
        max_user_tokens=config.max_user_tokens, max_item_tokens=config.max_item_tokens,
        max_history_items=config.max_history_items, validation_users=validation,
        training_info={"dataset": data.name, "seed": seed},
    )
    served = evaluate_bundle(bundle, data, test, config.use_context, config.ks)
    stage = None if ranking is None else ranking_stage_report.measure(data, checkpoint_dir(run_dir), ranking_report,
                                                                      len(test), bundle)
    no_lm = evaluate_without_language_model(data, sasrec, valid, test, tables, config.ks)
    policies = {policy: {name: row for name, row in metrics["policies"][policy].items() if name not in MODEL_FREE_ROWS}
                | no_lm.policies[policy] | served.get(policy, {}) for policy in POLICIES}
    ranks = {("llmrec", policy): metrics["test_ranks"][policy]["llmrec"] for policy in POLICIES}
    ranks |= {("no_lm_hybrid", policy): no_lm.hybrid_ranks[policy] for policy in POLICIES}
    ranks[("int8_hnsw_server", "deployed")] = served["served_ranks"]
    if any(len(values) != len(test) for values in ranks.values()):
        raise ValueError("the compared rows were evaluated on different users; this is a bug")
    # a multi-seed run takes hours on a CPU: each seed's results are worth having before the report
    logged = [f"{metric}@{k}" for k in config.ks for metric in ("recall", "ndcg")]
    for name in ("no_lm_hybrid", "llmrec", "int8_exact", "int8_hnsw_server"):
        row = policies["deployed"][name]
        log.info("seed %d %s: %s", seed, name, " ".join(f"{key}={row[key]:.4f}" for key in logged))
    llmrec_adjustments = {"history_item_score": metrics["adjustments"]["history_item_score"]}
    return {"policies": policies, "ranks": ranks, "run": metrics, "ranking_stage": stage,
            "model_free": {policy: {name: metrics["policies"][policy][name] for name in MODEL_FREE_ROWS
                                    if name in metrics["policies"][policy]} for policy in POLICIES},
            "history_scores": metrics["history_scores"] | no_lm.weights | {"llmrec": llmrec_adjustments},
            "no_lm": {"weights": no_lm.weights["no_lm_hybrid"], "sasrec": no_lm.sasrec},
            "adjustments": {"chosen": metrics["adjustments"], "metric": metrics["calibration_metric"],
                            "validation": metrics["adjustments_validation"]}}


def language_model_contribution(ranks: list[dict]) -> list[dict]:
    """Each of CONTRIBUTIONS minus the no-LM hybrid under the same policy, paired over the same test users
    (significance.compare): for the seed-averaged per-user metrics and, with several seeds, for each seed."""
    contributions = []
    for system, policy in CONTRIBUTIONS:
        ours = [seed_ranks[(system, policy)] for seed_ranks in ranks]
        hybrid = [seed_ranks[("no_lm_hybrid", policy)] for seed_ranks in ranks]
        contributions.append({"system": system, "policy": policy, "baseline": "no_lm_hybrid",
                              "seed_averaged": compare(ours, hybrid),
                              "per_seed": [compare([a], [b]) for a, b in zip(ours, hybrid)] if len(ranks) > 1 else []})
    return contributions


def _ordered(rows: dict) -> dict:
    return {name: rows[name] for name in ROWS if name in rows}


def _mean(per_seed: list[dict], policy: str, name: str) -> dict:
    return {k: float(np.mean([row[policy][name][k] for row in per_seed])) for k in per_seed[0][policy][name]}


def _std(per_seed: list[dict], policy: str, name: str) -> dict:
    return {k: float(np.std([row[policy][name][k] for row in per_seed])) for k in per_seed[0][policy][name]}


def main(
    data: Path = typer.Option(..., help="data set directory"),
    runs: Path = typer.Option(..., help="run directory of seed 0 (seed k uses <runs>-seed<k>)"),
    bundles: Path = typer.Option(..., help="evaluation bundles go to <bundles>/seed<k>/"),
    report: Path = typer.Option(..., help="report directory"),
    seeds: int = typer.Option(1, min=1),
    time_budget_minutes: float = typer.Option(EVAL_TIME_BUDGET_MINUTES, help="training time per seed"),
    max_steps: int = typer.Option(EVAL_MAX_STEPS, help="training steps per seed, if the time budget lasts"),
    sasrec_epochs: int = typer.Option(SASRecConfig.max_epochs, min=1,
                                      help="SASRec epochs at most; it stops earlier when validation NDCG@10 stops "
                                           "improving, never on a clock"),
    sequence_minutes: float = typer.Option(SequenceModelConfig.time_budget_minutes,
                                           help="training time of the sequence model per seed"),
    eval_users: int = typer.Option(0, help="evaluate on the first N test users (0 = all)"),
    history_dropout: float = HISTORY_DROPOUT,
    frozen_layers: int = FROZEN_LAYERS,
    ranking_stage_steps: int = typer.Option(0, min=0, help="train the ranking stage this many steps per seed (1200: "
                                                           "~32 min on 2 CPU cores) and report its gain and cost; 0: "
                                                           "no ranking stage"),
) -> None:
    configure_logging()
    config = TrainConfig(time_budget_minutes=time_budget_minutes, max_steps=max_steps, eval_users=eval_users,
                         history_dropout=history_dropout, frozen_layers=frozen_layers)
    summary = run_experiment(data, runs, bundles, report, seeds, config, SASRecConfig(max_epochs=sasrec_epochs),
                             SequenceModelConfig(time_budget_minutes=sequence_minutes),
                             RankerConfig(max_steps=ranking_stage_steps) if ranking_stage_steps else None)
    typer.echo((report / "report.md").read_text())
    typer.echo(f"INT8 + HNSW relative NDCG@10 loss: {summary['int8_hnsw_relative_ndcg10_loss']:.2%}")


if __name__ == "__main__":
    typer.run(main)
