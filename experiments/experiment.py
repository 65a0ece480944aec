"""`make eval`: train (per seed), export, and evaluate every model side by side in one run, then report.

Rows: popularity, zero-shot encoder, SASRec (ID baseline), co-occurrence alone (no model), the sequence model
over item vectors alone, llmrec in PyTorch FP32 with exact search, the exported INT8 model with exact search,
and INT8 + HNSW through the server's own code path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import typer

from llmrec.export.bundle import build_bundle
from experiments.evaluate_bundle import evaluate_bundle
from experiments.baselines.sasrec import SASRecConfig, sasrec_scores, train_sasrec
from llmrec.training.calibration import calibration_search, cooccurrence_before, cooccurrence_only_scores
from llmrec.training.checkpoint import checkpoint_dir
from llmrec.training.cli_options import FROZEN_LAYERS, HISTORY_DROPOUT, configure_logging
from llmrec.training.config import TrainConfig
from llmrec.training.data import load_interactions, split_examples, user_text
from llmrec.training.evaluation import evaluate
from experiments.report import write_report
from llmrec.training.model import TextRecommender, pretrained_encoder_path
from llmrec.training.sequence_model import SequenceModelConfig
from llmrec.training.train import finish_run, train

log = logging.getLogger("llmrec.experiment")

# Unlike the short demo of `make run`, an evaluation trains each seed for up to 80 minutes, so that a seed fits
# the 90 minutes a 2-core CPU machine may spend on it: ~4 epochs of Amazon Scientific.
EVAL_TIME_BUDGET_MINUTES = 80.0
EVAL_MAX_STEPS = 100_000
# rows that depend on neither the trained model nor its seed: evaluated once, with seed 0
MODEL_FREE_ROWS = ("popularity", "zero_shot")


def _as_json(value) -> object:
    return json.loads(json.dumps(value))


def _train_or_reuse(data, config: TrainConfig, sequence: SequenceModelConfig, run_dir: Path,
                    model_free_baselines: bool) -> dict:
    """A run directory whose metrics.json was made with exactly this config is reused (e.g. after `make train`);
    one that differs only in how it is finished (TrainConfig.FINISHING_FIELDS, the sequence model, the adjustments'
    search) keeps its text model and is finished again (sequence model, adjustments, evaluation), not retrained."""
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        trained = {name: value for name, value in metrics["config"].items() if name not in config.FINISHING_FIELDS}
        if trained == config.training_fields():
            if (metrics["config"] == _as_json(dataclasses.asdict(config))
                    and metrics.get("calibration_search") == _as_json(calibration_search())
                    and metrics.get("sequence_model", {}).get("config") == _as_json(dataclasses.asdict(sequence))):
                log.info("reusing %s (trained and finished with this exact config)", run_dir)
                return metrics
            log.info("reusing the text model in %s (trained with these settings); finishing it again", run_dir)
            model = TextRecommender.from_checkpoint(checkpoint_dir(run_dir))
            training = {key: metrics[key] for key in ("world_size", "device", "bf16", "train_seconds", "steps", "curve")
                        if key in metrics}
            return finish_run(model, data, config, run_dir, pretrained_encoder_path(), training, sequence,
                              model_free_baselines)
    return train(data, config, run_dir, sequence_config=sequence, model_free_baselines=model_free_baselines)


def run_experiment(data_path: Path, run_root: Path, bundle_root: Path, report_dir: Path, seeds: int,
                   config: TrainConfig, sasrec: SASRecConfig,
                   sequence: SequenceModelConfig = SequenceModelConfig()) -> dict:
    data = load_interactions(data_path)
    test = split_examples(data, "test")
    if config.eval_users:
        test = test[: config.eval_users]
    per_seed, curves, train_seconds, train_devices, sequence_seconds, adjustments = [], [], [], [], [], []
    for seed in range(seeds):
        seed_config = dataclasses.replace(config, seed=seed)
        run_dir = run_root if seed == 0 else run_root.with_name(f"{run_root.name}-seed{seed}")
        metrics = _train_or_reuse(data, seed_config, dataclasses.replace(sequence, seed=seed), run_dir,
                                  model_free_baselines=seed == 0)
        if seed == 0:
            model_free = {name: metrics["evaluation"][name] for name in MODEL_FREE_ROWS}
        validation = [user_text(data, e, seed_config.use_context) for e in split_examples(data, "valid")[:300]]
        bundle = build_bundle(
            checkpoint_dir(run_dir), list(zip(data.item_ids, data.items)), bundle_root / f"seed{seed}",
            max_user_tokens=seed_config.max_user_tokens, max_item_tokens=seed_config.max_item_tokens,
            max_history_items=seed_config.max_history_items, validation_users=validation,
            training_info={"dataset": data.name, "seed": seed},
        )
        rows = {name: row for name, row in metrics["evaluation"].items() if name not in MODEL_FREE_ROWS}
        rows.update(evaluate_bundle(bundle, data, test, seed_config.use_context, seed_config.ks))
        # a multi-seed run takes hours on a CPU: each seed's results are worth having before the report
        logged = [f"{metric}@{k}" for k in seed_config.ks for metric in ("recall", "ndcg")]
        for name in ("llmrec", "int8_exact", "int8_hnsw_server"):
            log.info("seed %d %s: %s", seed, name, " ".join(f"{key}={rows[name][key]:.4f}" for key in logged))
        per_seed.append(rows)
        curves.append(metrics["curve"])
        train_seconds.append(metrics["train_seconds"])
        train_devices.append(metrics.get("device"))  # absent from runs trained before it was recorded
        sequence_seconds.append(metrics["sequence_model"]["seconds"])
        adjustments.append({"chosen": metrics["adjustments"], "metric": metrics["calibration_metric"],
                            "validation": metrics["adjustments_validation"]})
    sasrec_model, sasrec_info = train_sasrec(data, sasrec)
    sasrec_metrics = evaluate(sasrec_scores(sasrec_model, data, sasrec), data, test, config.ks)
    cooccurrence = cooccurrence_only_scores(data, cooccurrence_before(data, "test"))
    cooccurrence_metrics = evaluate(cooccurrence, data, test, config.ks)

    names = list(per_seed[0])
    evaluation = {name: _mean(per_seed, name) for name in names} | model_free
    evaluation["sasrec"] = sasrec_metrics
    evaluation["cooccurrence_only"] = cooccurrence_metrics
    order = ["popularity", "zero_shot", "sasrec", "cooccurrence_only", "sequence_model_alone", "llmrec", "llmrec_without_context", "int8_exact", "int8_hnsw_server"]
    evaluation = {name: evaluation[name] for name in order if name in evaluation}
    fp32, served = evaluation["llmrec"]["ndcg@10"], evaluation["int8_hnsw_server"]["ndcg@10"]
    summary = {
        "dataset": data.name,
        "seeds": seeds,
        "config": dataclasses.asdict(config),
        "evaluation": evaluation,
        "spread": {name: _std(per_seed, name) for name in names} if seeds > 1 else {},
        "per_seed": per_seed,
        "int8_hnsw_relative_ndcg10_loss": (fp32 - served) / fp32 if fp32 else None,
        "sasrec": sasrec_info,
        "adjustments": adjustments,
        "train_seconds": train_seconds,  # per seed: the text model
        "train_devices": train_devices,  # per seed: where the text model trained
        "sequence_model_seconds": sequence_seconds,  # per seed: the sequence model, trained after it
        "steps": [len(curve) for curve in curves],  # per seed
        "curve": curves[0],
    }
    write_report(summary, report_dir)
    return summary


def _mean(per_seed: list[dict], name: str) -> dict:
    return {k: float(np.mean([row[name][k] for row in per_seed])) for k in per_seed[0][name]}


def _std(per_seed: list[dict], name: str) -> dict:
    return {k: float(np.std([row[name][k] for row in per_seed])) for k in per_seed[0][name]}


def main(
    data: Path = typer.Option(..., help="data set directory"),
    runs: Path = typer.Option(..., help="run directory of seed 0 (seed k uses <runs>-seed<k>)"),
    bundles: Path = typer.Option(..., help="evaluation bundles go to <bundles>/seed<k>/"),
    report: Path = typer.Option(..., help="report directory"),
    seeds: int = typer.Option(1, min=1),
    time_budget_minutes: float = typer.Option(EVAL_TIME_BUDGET_MINUTES, help="training time per seed"),
    max_steps: int = typer.Option(EVAL_MAX_STEPS, help="training steps per seed, if the time budget lasts"),
    sasrec_minutes: float = typer.Option(SASRecConfig.time_budget_minutes),
    sequence_minutes: float = typer.Option(SequenceModelConfig.time_budget_minutes,
                                           help="training time of the sequence model per seed"),
    eval_users: int = typer.Option(0, help="evaluate on the first N test users (0 = all)"),
    history_dropout: float = HISTORY_DROPOUT,
    frozen_layers: int = FROZEN_LAYERS,
) -> None:
    configure_logging()
    config = TrainConfig(time_budget_minutes=time_budget_minutes, max_steps=max_steps, eval_users=eval_users,
                         history_dropout=history_dropout, frozen_layers=frozen_layers)
    summary = run_experiment(data, runs, bundles, report, seeds, config, SASRecConfig(time_budget_minutes=sasrec_minutes),
                             SequenceModelConfig(time_budget_minutes=sequence_minutes))
    typer.echo((report / "report.md").read_text())
    typer.echo(f"INT8 + HNSW relative NDCG@10 loss: {summary['int8_hnsw_relative_ndcg10_loss']:.2%}")


if __name__ == "__main__":
    typer.run(main)
