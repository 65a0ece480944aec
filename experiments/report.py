"""Evaluation report of `make eval` (experiments/experiment.py's summary) or of one run's metrics.json: Markdown +
JSON + PNG plots (training curve, metric bars)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import typer  # noqa: E402

from experiments.significance import CONFIDENCE, RESAMPLES  # noqa: E402
from llmrec.scoring import Adjustments  # noqa: E402
from llmrec.training.calibration import (  # noqa: E402
    CALIBRATION_METRIC, COOCCURRENCE_WEIGHT_GRID, MODEL_WEIGHT_GRID, SERVED_SCORE_SPAN,
)

_ACCURACY = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
_BEYOND_ACCURACY = ("cold_recall@10", "cold_ndcg@10", "coverage@10", "popular_share@10")
_POLICY_TITLES = {
    "published": ("Published policy: history items ranked like any other item",
                  "The papers' protocol: no row gets a history item score. Ours (llmrec, INT8 exact) keep the other "
                  "adjustments chosen on validation, with the history item score forced to 0."),
    "deployed": ("Deployed policy: each row's own history item score, chosen on validation",
                 "Every row gets the history item score that is best for it on the validation users ours are "
                 f"calibrated on (grid and metric of training/calibration.py, {CALIBRATION_METRIC}); ours choose "
                 "it together with their other adjustments. Each other row's scores are first scaled so that their "
                 f"largest span over validation users is {SERVED_SCORE_SPAN:g}, the span of our served scores that "
                 "the grid is made for, so that a grid value means the same whatever the row's units (popularity "
                 "counts, SASRec logits, co-occurrence)."),
}


def write_report(summary: dict, out: Path) -> Path:
    """report.md, report.json and the plots in `out`; returns report.md's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    policies = summary["policies"]
    _plot_curve(summary["curve"], out / "training_curve.png")
    _plot_bars(policies["deployed"], out / "metrics.png")
    any_row = next(iter(policies["deployed"].values()))
    sections = [f"# Evaluation: {summary['dataset']}",
                f"Leave-one-out, full ranking over all items, the same test split for every row: "
                f"{int(any_row['examples'])} users ({int(any_row['cold_examples'])} with a cold target: never a "
                f"training target). Training per seed: {_training_note(summary)}."]
    if "cooccurrence_table" in summary:
        table = summary["cooccurrence_table"]
        sections.append(f"Co-occurrence table, the same for every row that uses one ({', '.join(table['rows'])}): "
                        f"{table['table']}; {table['pairs']:,} item pairs.")
    for policy in ("published", "deployed"):
        title, note = _POLICY_TITLES[policy]
        extra = {"history item score": _history_scores(summary)} if policy == "deployed" else {}
        sections += [f"## {title}", note, _table(policies[policy], summary.get("spread", {}).get(policy, {}),
                                                   _ACCURACY, extra)]
        for name, reason in summary.get("not_evaluated", {}).get(policy, {}).items():
            sections[-1] += f"\n| {name} | " + " | ".join(["n/a"] * len(_ACCURACY)) + " |"
            sections.append(f"{name} is n/a here: {reason}.")
    sections += [_hybrid_note(seed, hybrid) for seed, hybrid in enumerate(summary.get("no_lm_hybrid", []))]
    if summary.get("contribution"):
        sections += ["## Language model contribution", _contribution_note(summary),
                     _contribution_table(summary["contribution"])]
    if summary.get("ranking_stage"):
        sections += ["## Ranking stage", _ranking_stage_note(), _ranking_stage_table(summary["ranking_stage"])]
    sections += ["## Beyond accuracy (deployed policy)",
                 _table(policies["deployed"], summary.get("spread", {}).get("deployed", {}), _BEYOND_ACCURACY)]
    sections += _notes(summary)
    sections.append("![training curve](training_curve.png) ![metrics](metrics.png)")
    (out / "report.md").write_text("\n\n".join(sections) + "\n")
    return out / "report.md"


def _table(rows: dict, spread: dict, columns: tuple[str, ...], extra: dict[str, dict] | None = None) -> str:
    """A Markdown table of rows x columns, mean ± standard deviation over seeds where a row has a spread; extra:
    more columns, {title: {row: text}}."""
    extra = extra or {}
    lines = ["| model | " + " | ".join(columns + tuple(extra)) + " |", "|---" * (len(columns) + len(extra) + 1) + "|"]
    for name, values in rows.items():
        cells = [f"{values.get(c, float('nan')):.4f}" + (f" ± {spread[name][c]:.4f}" if name in spread else "")
                 for c in columns]
        cells += [texts.get(name, "") for texts in extra.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _history_scores(summary: dict) -> dict[str, str]:
    """Each row's deployed history item score, one per seed ("/"-separated); INT8 rows serve llmrec's."""
    chosen = {name: " / ".join(f"{seed['history_item_score']:g}" for seed in seeds)
              for name, seeds in summary.get("history_scores", {}).items()}
    if "llmrec" in chosen:
        chosen |= {name: chosen["llmrec"] for name in ("llmrec_without_context", "int8_exact", "int8_hnsw_server")}
    return chosen


def _hybrid_note(seed: int, hybrid: dict) -> str:
    weights, sasrec = hybrid["weights"], hybrid["sasrec"]
    at_edge = (weights["cooccurrence_weight"] == max(COOCCURRENCE_WEIGHT_GRID)
               and weights["model_weight"] == min(MODEL_WEIGHT_GRID))
    return (f"No-LM hybrid (seed {seed}): {weights['scale']:.4g} x SASRec score + {weights['cooccurrence_weight']:g} x "
            f"co-occurrence + {weights['history_item_score']:g} x [history item]: SASRec's scores scaled to span "
            f"{SERVED_SCORE_SPAN:g}, times a SASRec weight of {weights['model_weight']:g}; the weights chosen on "
            f"validation by training/calibration.py ({weights['metric']} {weights['validation_chosen']:.4f}, "
            f"{weights['validation_none']:.4f} with SASRec alone)"
            + (", at the edge of the grids: a wider search might find a better hybrid" if at_edge else "")
            + f". SASRec: full softmax cross-entropy at every position, {sasrec['epochs']} epochs, stopped by "
            f"{_stopped(sasrec['stopped'])} (validation NDCG@10 {sasrec['valid_ndcg@10']:.4f}, "
            f"{sasrec['seconds']:.0f} s).")


def _stopped(reason: str) -> str:
    return "early stopping (validation NDCG@10 stopped improving)" if reason == "converged" else \
        "its epoch bound before validation stopped improving: raise --sasrec-epochs"


def _contribution_note(summary: dict) -> str:
    users = summary["contribution"][0]["seed_averaged"]["ndcg@10"]["users"]
    seeds = f" Over {summary['seeds']} seeds: each user's metric averaged over seeds, then each seed alone." \
        if summary.get("seeds", 1) > 1 else ""
    return (f"Ours minus the no-LM hybrid under the same policy, paired over the same {users} test users: mean "
            f"per-user difference, its {CONFIDENCE:.0%} paired bootstrap interval (BCa, {RESAMPLES:,} resamples of "
            f"users), the two-sided paired randomization p-value ({RESAMPLES:,} random swaps of each user's two "
            f"results) and a paired t-test p-value; ratio: ours / no-LM hybrid, NDCG@10.{seeds}")


def _contribution_table(contribution: list[dict]) -> str:
    columns = ("ours", "policy", "seeds", "ΔNDCG@10 [95% CI]", "p", "p (t-test)", "ΔRecall@10 [95% CI]", "p",
               "NDCG@10 ratio")
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for entry in contribution:
        results = [("averaged", entry["seed_averaged"])] + [(f"seed {n}", r) for n, r in enumerate(entry["per_seed"])]
        for seeds, result in results:
            ndcg, recall = result["ndcg@10"], result["recall@10"]
            lines.append(f"| {entry['system']} | {entry['policy']} | {seeds} | {_difference(ndcg)} | "
                         f"{ndcg['p_value']:.2g} | {ndcg['t_test_p_value']:.2g} | {_difference(recall)} | "
                         f"{recall['p_value']:.2g} | {_ratio(ndcg['ratio'])} |")
    return "\n".join(lines)


def _ranking_stage_note() -> str:
    return ("Each seed's cross-encoder re-scores its first stage's best candidates (score + weight x logit), the "
            "weight and candidate count chosen on the validation users our adjustments are chosen on; the test users "
            "above, deployed policy, exact search. Differences vs the first stage: mean per user, "
            f"{CONFIDENCE:.0%} paired bootstrap interval. Cost on this machine's CPU: the INT8 stage alone, and "
            "Recommend through llmrec-server at concurrency 1 with and without it (alternating). Each seed's full "
            "report: ranking-stage/seed<k>/report.md.")


def _ranking_stage_table(seeds: list[dict]) -> str:
    lines = ["| seed | weight, candidates | first stage N@10 | + stage INT8 N@10 | difference | stage p50 / p99 ms "
             "| Recommend p50 / p99 added ms |", "|---|---|---:|---:|---:|---:|---:|"]
    for seed, stage in enumerate(seeds):
        chosen, rows, served = stage["chosen_on_validation"], stage["rows"], stage.get("served_c1")
        added = "n/a" if not served else (
            f"{served['with_ranking_stage_ms']['p50'] - served['first_stage_ms']['p50']:+.1f} / "
            f"{served['with_ranking_stage_ms']['p99'] - served['first_stage_ms']['p99']:+.1f}")
        lines.append(f"| {seed} | {chosen['weight']:g}, {chosen['candidates']} | {rows['first_stage']['ndcg@10']:.4f} | "
                     f"{rows['ranking_stage_int8']['ndcg@10']:.4f} | "
                     f"{_difference(stage['vs_first_stage']['ranking_stage_int8']['ndcg@10'])} | "
                     f"{stage['stage_ms']['p50']:.1f} / {stage['stage_ms']['p99']:.1f} | {added} |")
    return "\n".join(lines)


def _ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


def _difference(result: dict) -> str:
    return f"{result['mean']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}]"


def _notes(summary: dict) -> list[str]:
    notes = []
    if summary.get("seeds", 1) > 1:
        notes.append(f"Mean ± standard deviation over {summary['seeds']} seeds. Rows without a spread (popularity, "
                     "zero-shot, co-occurrence alone) do not depend on a seed and are evaluated once.")
    if summary.get("int8_hnsw_relative_ndcg10_loss") is not None:
        notes.append(f"NDCG@10 lost to INT8 + HNSW (served path) vs PyTorch FP32 exact, deployed policy: "
                     f"{summary['int8_hnsw_relative_ndcg10_loss']:.2%} (relative).")
    notes += [_calibration_note(seed, chosen) for seed, chosen in enumerate(summary.get("adjustments", []))]
    return notes


def _training_note(metrics: dict) -> str:
    devices = metrics.get("train_devices") or [None] * len(metrics["steps"])
    return ", ".join(f"{steps} steps in {seconds:.0f} s{f' on {device}' if device else ''}, then the sequence model "
                     f"in {extra:.0f} s" for steps, seconds, device, extra in
                     zip(metrics["steps"], metrics["train_seconds"], devices, metrics["sequence_model_seconds"]))


def _calibration_note(seed: int, chosen: dict) -> str:
    """What the adjustments chosen on validation bought there, beside the best choice for NDCG@10 alone."""
    table, metric = chosen["validation"], chosen["metric"]

    def described(key: str) -> str:
        return " / ".join(f"{value:.4f}" for value in table[key].values())

    key = Adjustments(**chosen["chosen"]).key
    top10_key = max(table, key=lambda k: table[k]["ndcg@10"])
    history_only_key = max((k for k in table if k.endswith(",0.0,0.0,0.0")), key=lambda k: table[k][metric])
    return (f"Seed {seed}: history item score, co-occurrence weight, history vector weight and sequence model "
            f"weight {key} chosen by "
            f"validation {metric}. Validation {' / '.join(table[key])}: {described(key)} "
            f"chosen; {described(top10_key)} for the best NDCG@10 ({top10_key}); "
            f"{described(history_only_key)} with the history item score alone; "
            f"{described(Adjustments().key)} with none.")


def _plot_curve(curve: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = [point["step"] for point in curve]
    losses = [point["loss"] for point in curve]
    window = max(1, len(losses) // 20)
    smoothed = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    axis.plot(steps, losses, alpha=0.3, label="loss")
    axis.plot(steps, smoothed, label=f"mean of {window}")
    axis.set(xlabel="step", ylabel="full-softmax cross-entropy", title="training curve")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_bars(evaluation: dict, path: Path) -> None:
    metrics = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(evaluation)
    for offset, (name, values) in enumerate(evaluation.items()):
        axis.bar([i + offset * width for i in range(len(metrics))], [values[m] for m in metrics], width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], metrics)
    axis.set(title="full-ranking quality, test split, deployed policy")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summary_of_run(metrics: dict) -> dict:
    """One run's metrics.json (training/train.py) in the shape of `make eval`'s summary: one seed, its rows."""
    return {"dataset": metrics["dataset"], "seeds": 1, "policies": metrics["policies"],
            "history_scores": {name: [chosen] for name, chosen in metrics["history_scores"].items()}
            | {"llmrec": [metrics["adjustments"]]},
            "steps": [metrics["steps"]], "train_seconds": [metrics["train_seconds"]],
            "train_devices": [metrics.get("device")], "sequence_model_seconds": [metrics["sequence_model"]["seconds"]],
            "curve": metrics["curve"], "adjustments": [{"chosen": metrics["adjustments"],
                                                        "metric": metrics["calibration_metric"],
                                                        "validation": metrics["adjustments_validation"]}]}


def main(run: Path = typer.Option(..., help="run directory holding metrics.json"),
         out: Path = typer.Option(..., help="report directory")) -> None:
    typer.echo(f"report: {write_report(summary_of_run(json.loads((run / 'metrics.json').read_text())), out)}")


if __name__ == "__main__":
    typer.run(main)
