"""Evaluation report from a run's metrics.json: Markdown + JSON + PNG plots (training curve, metric bars)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import typer  # noqa: E402

from llmrec.scoring import Adjustments  # noqa: E402

_COLUMNS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "cold_recall@10", "cold_ndcg@10", "coverage@10", "popular_share@10")


def write_report(metrics: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    evaluation = metrics["evaluation"]
    (out / "report.json").write_text(json.dumps(metrics, indent=2))
    _plot_curve(metrics["curve"], out / "training_curve.png")
    _plot_bars(evaluation, out / "metrics.png")
    spread = metrics.get("spread", {})
    rows = ["| model | " + " | ".join(_COLUMNS) + " |", "|---" * (len(_COLUMNS) + 1) + "|"]
    for name, values in evaluation.items():
        cells = [f"{values.get(c, float('nan')):.4f}" + (f" ± {spread[name][c]:.4f}" if name in spread else "") for c in _COLUMNS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    any_model = next(iter(evaluation.values()))
    notes = []
    if metrics.get("seeds", 1) > 1:
        notes.append(f"Our model: mean ± standard deviation over {metrics['seeds']} seeds. Rows without a spread "
                     "do not depend on our model's seed and are evaluated once.")
    if metrics.get("int8_hnsw_relative_ndcg10_loss") is not None:
        notes.append(f"NDCG@10 lost to INT8 + HNSW (served path) vs PyTorch FP32 exact: "
                     f"{metrics['int8_hnsw_relative_ndcg10_loss']:.2%} (relative).")
    for seed, chosen in enumerate(metrics.get("adjustments", [])):
        notes.append(_calibration_note(seed, chosen))
    text = f"""# Evaluation: {metrics['dataset']}

Leave-one-out, full ranking over all items, history items kept in the ranking; test split,
{int(any_model['examples'])} users ({int(any_model['cold_examples'])} with a cold target: never a training target).
Training per seed: {_training_note(metrics)}.

{chr(10).join(rows)}

{(chr(10) * 2).join(notes)}

![training curve](training_curve.png) ![metrics](metrics.png)
"""
    (out / "report.md").write_text(text)
    return out / "report.md"


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
    axis.set(title="full-ranking quality, test split")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(run: Path = typer.Option(..., help="run directory holding metrics.json"),
         out: Path = typer.Option(..., help="report directory")) -> None:
    typer.echo(f"report: {write_report(json.loads((run / 'metrics.json').read_text()), out)}")


if __name__ == "__main__":
    typer.run(main)
