"""What the fast path loses: llmrec's scoring rule without the encoder's user vector (no encoder run) against the
full path, on validation users (never the test split: nothing here is chosen or reported on it).

    python -m experiments.fast_path --data data/ml-100k --checkpoint runs/ml-100k/checkpoint \
        --report reports/fast-path/ml-100k [--save-to-checkpoint]

Rows, each ranked over the whole catalogue by llmrec.scoring.ScoringRule.dense_scores on the same validation users:
- full: the encoder's user vector of the history and its context (the request's timestamp) with the checkpoint's
  adjustments, as the bundle serves it;
- full_without_context: the same user vectors rendered without context: how much the context adds, which decides
  whether a request with context may take the fast path (docs/serving.md);
- fast_user_map: as served: the user vector predicted from the history's item vectors by the fast path's user map
  (llmrec.fast_user), with adjustments chosen on these users by training's own search (training/calibration.py,
  choose_fast_path); each user's vector is predicted by the map fitted on the other folds of users (held out);
- fast_user_map_cross_fitted: the same, each fold's map and adjustments both chosen on the other folds only (an
  out-of-sample check of the whole choice; the full path's adjustments were chosen on all validation users);
- fast_zero_vector: no user map, a zero user vector (the history vector, the sequence model and co-occurrence
  only) with its own adjustments (choose_fast_adjustments): what the map adds.
Paired comparisons against full (experiments/significance.py: bootstrap interval, randomization p-value).
The encoder's outputs are kept in <report>/vectors.npz, so a rerun skips the encoding (remove it after retraining).
--save-to-checkpoint writes the fast path's adjustments and user map (fitted on all these users) into the
checkpoint's item head, so that `make export` puts them in the bundle; checkpoints trained since choose them in
training already.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import typer

from experiments.significance import CONFIDENCE, compare
from llmrec.scoring import Adjustments, ScoringRule, item_rows
from llmrec.training.calibration import (
    CALIBRATION_METRIC, choose_fast_adjustments, choose_fast_path, cooccurrence_before, histories,
)
from llmrec.training.checkpoint import CheckpointLayout
from llmrec.training.cli_options import configure_logging
from llmrec.training.config import TrainConfig
from llmrec.training.data import Example, Interactions, load_interactions, split_examples
from llmrec.training.evaluation import ScoreFn, evaluate
from llmrec.training.model import TextRecommender, load_item_head, save_fast_path
from llmrec.training.progress import phase
from llmrec.training.sequence_model import load_sequence_model
from llmrec.training.train import catalogue_vectors, histories_sequence_vectors, user_vectors

log = logging.getLogger("llmrec.fast_path")

KS = (10, 50)
# The quality target of issue 37: the fast path within 1% relative NDCG@10 of the full path on validation.
TARGET_RELATIVE_NDCG10_LOSS = 0.01


@dataclasses.dataclass
class Inputs:
    """Everything the rows are scored from, for the validation users `examples`."""

    data: Interactions
    examples: list[Example]
    rows: np.ndarray  # item_rows of the catalogue
    unit: np.ndarray  # (items, dim) item vectors
    table: object  # cooccurrence_before(data, "valid")
    sequences: np.ndarray | None  # (users, dim) sequence model vectors


def dense(inputs: Inputs, users: np.ndarray, adjustments: Adjustments, examples: Sequence[Example] | None = None,
          ) -> ScoreFn:
    """The scoring rule's dense scores for `examples` (default: all of inputs') given their user vectors."""
    examples = inputs.examples if examples is None else examples
    position = {id(e): n for n, e in enumerate(examples)}
    rule = ScoringRule(adjustments)

    def score(batch: Sequence[Example]) -> np.ndarray:
        at = np.array([position[id(e)] for e in batch], dtype=np.int64)
        return rule.dense_scores(users[at], inputs.rows, histories(inputs.data, batch), inputs.table,
                                 None if inputs.sequences is None else inputs.sequences[at])
    return score


def subset(inputs: Inputs, at: np.ndarray) -> Inputs:
    return dataclasses.replace(inputs, examples=[inputs.examples[i] for i in at],
                               sequences=None if inputs.sequences is None else inputs.sequences[at])


def cross_fitted_ranks(inputs: Inputs, user_vectors: np.ndarray, folds: int, seed: int,
                       ) -> tuple[np.ndarray, list[dict]]:
    """Each user's target rank on the fast path with the user map and adjustments chosen on the other folds (users
    n % folds): training's choose_fast_path on those users only."""
    n = len(inputs.examples)
    ranks = np.empty(n, dtype=np.int64)
    chosen = []
    for fold in range(folds):
        held = np.arange(fold, n, folds)
        others = np.setdiff1d(np.arange(n), held)
        rest = subset(inputs, others)
        adjustments, fit, _ = choose_fast_path(inputs.rows, inputs.unit, inputs.data, rest.examples, inputs.table,
                                               rest.sequences, user_vectors[others], seed)
        sub = subset(inputs, held)
        predicted = fit.map.catalogue_user_vectors(inputs.unit, histories(inputs.data, sub.examples))
        _, held_ranks = evaluate(dense(sub, predicted, adjustments), inputs.data, sub.examples, KS,
                                 desc=f"fast path, fold {fold}", return_ranks=True)
        ranks[held] = held_ranks
        chosen.append(dataclasses.asdict(adjustments))
    return ranks, chosen


def run(data_path: Path, checkpoint: Path, report: Path, users: int, folds: int, save_to_checkpoint: bool) -> dict:
    data = load_interactions(data_path)
    examples = split_examples(data, "valid")[: users or None]
    layout = CheckpointLayout(checkpoint)
    config = TrainConfig.load(layout.config)
    head = load_item_head(checkpoint)
    if head is None or not head.calibrated:
        raise typer.BadParameter(f"{checkpoint} is not a calibrated training checkpoint")
    cache = report / "vectors.npz"  # the encoder's outputs: a rerun (another --folds, a fix) skips the encoding
    if cache.is_file():
        log.info("reusing the vectors in %s", cache)
        with np.load(cache) as saved:
            unit, bias, with_context, without_context = (saved[k] for k in ("unit", "bias", "with", "without"))
    else:
        model = TextRecommender.from_checkpoint(checkpoint)
        with phase("encode the catalogue", log):
            unit = catalogue_vectors(model, data, config).cpu().numpy()
        bias = model.item_bias.detach().cpu().numpy()
        with phase(f"encode {len(examples)} validation users (with and without context)", log):
            with_context = user_vectors(model, data, examples, config, use_context=config.use_context)
            without_context = user_vectors(model, data, examples, config, use_context=False) \
                if config.use_context else with_context
        report.mkdir(parents=True, exist_ok=True)
        np.savez(cache, unit=unit, bias=bias, users=len(examples), **{"with": with_context, "without": without_context})
    if len(with_context) != len(examples):
        raise typer.BadParameter(f"{cache} holds {len(with_context)} users, not {len(examples)}: remove it")
    rows = item_rows(unit, bias, config.temperature)
    sequence_model = load_sequence_model(layout.sequence_model)
    sequences = None if sequence_model is None else histories_sequence_vectors(sequence_model, data, examples, unit)
    inputs = Inputs(data, examples, rows, unit, cooccurrence_before(data, "valid"), sequences)
    with phase("fit the fast path's user map and choose its adjustments", log):
        fast, fit, fast_validation = choose_fast_path(rows, unit, data, examples, inputs.table, sequences,
                                                      with_context, config.seed)
    log.info("fast path adjustments %s (model weight %g, %s %.4f), user map %s", fast,
             fast_validation["model_weight"], CALIBRATION_METRIC, fast_validation[CALIBRATION_METRIC],
             fast_validation["user_map"])
    with phase("choose the zero vector's adjustments", log):
        zero, zero_validation = choose_fast_adjustments(rows, unit, data, examples, inputs.table, sequences)
    rows_out, ranks = {}, {}
    for name, vectors, adjustments in (("full", with_context, head.adjustments),
                                       ("full_without_context", without_context, head.adjustments),
                                       ("fast_user_map", fit.held_out, fast),
                                       ("fast_zero_vector", np.zeros_like(with_context), zero)):
        rows_out[name], ranks[name] = evaluate(dense(inputs, vectors, adjustments), data, examples, KS, desc=name,
                                               return_ranks=True)
    chosen_per_fold: list[dict] = []
    if folds > 1:
        with phase(f"fast path, {folds}-fold cross-fitted user map and adjustments", log):
            ranks["fast_user_map_cross_fitted"], chosen_per_fold = cross_fitted_ranks(inputs, with_context, folds,
                                                                                      config.seed)
    comparisons = {name: compare([ranks[name]], [ranks["full"]]) for name in ranks if name != "full"}
    full_ndcg = rows_out["full"]["ndcg@10"]
    relative = {name: 1.0 - comparisons[name]["ndcg@10"]["system"] / full_ndcg if full_ndcg else None
                for name in comparisons}
    summary = {
        "dataset": data.name,
        "split": "valid",
        "users": len(examples),
        "checkpoint": str(checkpoint),
        "use_context": config.use_context,
        "adjustments": {"full": dataclasses.asdict(head.adjustments), "fast": dataclasses.asdict(fast),
                        "fast_model_weight": fast_validation["model_weight"], "fast_per_fold": chosen_per_fold,
                        "fast_zero_vector": dataclasses.asdict(zero),
                        "fast_zero_vector_model_weight": zero_validation["model_weight"]},
        "user_map": fast_validation["user_map"],
        "calibration_metric": CALIBRATION_METRIC,
        "rows": rows_out,
        "comparisons_vs_full": comparisons,
        "relative_ndcg10_loss_vs_full": relative,
        "target_relative_ndcg10_loss": TARGET_RELATIVE_NDCG10_LOSS,
    }
    report.mkdir(parents=True, exist_ok=True)
    (report / "report.json").write_text(json.dumps(summary, indent=2))
    (report / "report.md").write_text(markdown(summary))
    if save_to_checkpoint:
        save_fast_path(checkpoint, fast, fit.map)
        log.info("fast path adjustments and user map written into %s", layout.item_head)
    return summary


def markdown(summary: dict) -> str:
    rows, comparisons, relative = summary["rows"], summary["comparisons_vs_full"], summary["relative_ndcg10_loss_vs_full"]
    lines = [
        f"# Fast path vs full path: {summary['dataset']}, {summary['users']} validation users",
        "",
        "Full ranking over the catalogue by llmrec.scoring's rule (dense_scores). fast_user_map = as served (no "
        "encoder run): the user vector predicted from the history's item vectors by the user map (each user's by the "
        "map fitted on the other folds), adjustments chosen on these users by training's search "
        f"({summary['calibration_metric']}); fast_user_map_cross_fitted = each fold's map and adjustments chosen on "
        "the other folds; fast_zero_vector = a zero user vector with its own adjustments (no map). "
        f"Differences vs full: mean per user, {CONFIDENCE:.0%} paired bootstrap interval, randomization p-value.",
        "",
        "| row | NDCG@10 | Recall@10 | NDCG@50 | Recall@50 | NDCG@10 vs full [interval] | Recall@10 vs full "
        "[interval] | relative NDCG@10 loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = list(rows) + [n for n in comparisons if n not in rows]
    for name in names:
        row = rows.get(name)
        cells = [f"{row[m]:.4f}" for m in ("ndcg@10", "recall@10", "ndcg@50", "recall@50")] if row else \
            [f"{comparisons[name]['ndcg@10']['system']:.4f}", f"{comparisons[name]['recall@10']['system']:.4f}", "",
             ""]
        if name in comparisons:
            diff = [f"{c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] p={c['p_value']:.3g}"
                    for c in (comparisons[name]["ndcg@10"], comparisons[name]["recall@10"])]
            loss = f"{relative[name]:.2%}" if relative[name] is not None else ""
        else:
            diff, loss = ["", ""], ""
        lines.append(f"| {name} | " + " | ".join(cells + diff + [loss]) + " |")
    adjustments = summary["adjustments"]
    lines += ["", "Adjustments (history_item_score, cooccurrence_weight, history_vector_weight, sequence_weight):", "",
              f"- full (the checkpoint's): {adjustments['full']}",
              f"- fast_user_map: {adjustments['fast']} (chosen at model weight {adjustments['fast_model_weight']:g})"]
    lines += [f"- fast_user_map, fold {n} (chosen on the other folds): {a}"
              for n, a in enumerate(adjustments["fast_per_fold"])]
    lines += [f"- fast_zero_vector: {adjustments['fast_zero_vector']} (chosen at model weight "
              f"{adjustments['fast_zero_vector_model_weight']:g})"]
    user_map = summary["user_map"]
    lines += ["", f"User map (llmrec.fast_user): fitted on {user_map['users']} users' encoder vectors, ridge strength "
              f"{user_map['alpha']:g}, held-out R^2 {user_map['held_out_r2']:.3f}."]
    lines += ["", f"Target: relative NDCG@10 loss of fast_user_map vs full <= "
              f"{summary['target_relative_ndcg10_loss']:.0%}."]
    return "\n".join(lines) + "\n"


def main(
    data: Path = typer.Option(..., help="data set directory"),
    checkpoint: Path = typer.Option(..., help="training checkpoint (trained and calibrated)"),
    report: Path = typer.Option(..., help="report directory: report.md and report.json"),
    users: int = typer.Option(0, help="the first N validation users (0 = all)"),
    folds: int = typer.Option(2, min=0, help="cross-fitting folds of the user map and adjustments (0 or 1: none)"),
    save_to_checkpoint: bool = typer.Option(False, "--save-to-checkpoint",
                                            help="write the fast adjustments into the checkpoint's item head"),
) -> None:
    configure_logging()
    run(data, checkpoint, report, users, folds, save_to_checkpoint)
    typer.echo((report / "report.md").read_text())


if __name__ == "__main__":
    typer.run(main)
