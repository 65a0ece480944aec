"""The ranking stage on the test split, once, with what training chose on validation: its gain over the first stage
and its cost.

    python -m llmrec.training.ranking_stage --data D --checkpoint C     # train; weight chosen on validation
    python -m experiments.ranking_stage --data D --checkpoint C --report reports/ranking-stage/<data>

Rows (the same test users, full ranking, the served history policy): the first stage (the checkpoint's scoring
rule, the full path's encoder user vectors, exact search); the first stage re-scored by the cross-encoder in
PyTorch FP32; the same with the exported INT8 ONNX model (llmrec.ranking_stage.PairScorer, what the server runs).
Paired differences against the first stage (experiments/significance.py). Cost: the INT8 stage's time for one
user's candidates (tokenize + one run), median and p99 over the ranked users, one request at a time; with --bundle
(a bundle exported from this checkpoint), also Recommend's latency through a real server at concurrency 1, with and
without the stage, alternating request by request over the same users' histories.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from experiments.significance import CONFIDENCE, compare
from llmrec.clients.client import RecommenderClient
from llmrec.export.ranking_stage import export_ranker_int8
from llmrec.ranking_stage import PairScorer
from llmrec.template import render_item
from llmrec.training.cli_options import configure_logging
from llmrec.training.data import Interactions, load_interactions, split_examples
from llmrec.training.evaluation import ranking_metrics
from llmrec.training.progress import phase
from llmrec.training.ranking_stage import (
    RANKER_DIR, RANKER_SETTINGS_FILE, CrossEncoder, FirstStage, pair_logits, reranked_ranks,
)

log = logging.getLogger("llmrec.ranking_stage")
KS = (10, 50)


def served_latency(bundle: Path, histories: list[list[str]], k: int, log_dir: Path) -> dict:
    """Recommend's c=1 latency (ms) through `llmrec-server --bundle`, each history (its most recent items, as many
    as the server takes) asked with and without the ranking stage in alternating order (the first 10 are warm-up
    and not counted)."""
    from bench.bench import start_llmrec  # a repo-level module: experiments run from the checkout

    server = start_llmrec(bundle, log_dir / "ranking-stage-server.log")
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        with RecommenderClient(server.target, timeout_s=30.0) as client:
            limit = client.model_info().max_history_items
            for n, history in enumerate(history[-limit:] for history in histories):
                for flag in (False, True) if n % 2 == 0 else (True, False):
                    started = time.perf_counter()
                    client.recommend(history, k=k, ranking_stage=flag)
                    if n >= 10:
                        times[flag].append((time.perf_counter() - started) * 1e3)
    finally:
        server.stop()
    off, on = np.array(times[False]), np.array(times[True])
    return {"requests_each": len(off), "k": k,
            "first_stage_ms": {"p50": float(np.median(off)), "p99": float(np.quantile(off, 0.99))},
            "with_ranking_stage_ms": {"p50": float(np.median(on)), "p99": float(np.quantile(on, 0.99))}}


def run(data_path: Path, checkpoint: Path, report: Path, users: int, bundle: Path | None = None,
        latency_users: int = 300) -> dict:
    return measure(load_interactions(data_path), checkpoint, report, users, bundle, latency_users)


def measure(data: Interactions, checkpoint: Path, report: Path, users: int, bundle: Path | None = None,
            latency_users: int = 300) -> dict:
    """The report (report.md, report.json in `report`) of the checkpoint's ranking stage on the first `users` test
    users (0: all)."""
    ranker_dir = Path(checkpoint) / RANKER_DIR
    chosen = json.loads((ranker_dir / RANKER_SETTINGS_FILE).read_text())
    weight, candidates, max_length = chosen["weight"], chosen["candidates"], chosen["max_length"]
    stage = FirstStage.load(data, checkpoint, "test")
    examples = split_examples(data, "test")[: users or None]
    targets = np.array([data.sequences[e.user][e.target_position] for e in examples])
    top, first, first_ranks = stage.top(examples, stage.encoder_users(examples), candidates)
    user_texts = stage.user_texts(examples)
    item_texts = [render_item(item) for item in data.items]
    with phase("cross-encoder, PyTorch FP32", log):
        fp32 = pair_logits(CrossEncoder(ranker_dir), user_texts, top, item_texts, max_length)
    with tempfile.TemporaryDirectory() as work:
        scorer = PairScorer(export_ranker_int8(ranker_dir, Path(work)), ranker_dir / "tokenizer.json", max_length)
        int8 = np.empty_like(fp32)
        seconds = np.empty(len(examples))
        with phase("cross-encoder, INT8 ONNX, one user at a time", log):
            for row, text in enumerate(user_texts):
                started = time.perf_counter()
                int8[row] = scorer.logits(text, [item_texts[item] for item in top[row]])
                seconds[row] = time.perf_counter() - started
    ranks = {"first_stage": first_ranks,
             "ranking_stage_fp32": reranked_ranks(top, first, fp32, targets, weight, candidates, first_ranks),
             "ranking_stage_int8": reranked_ranks(top, first, int8, targets, weight, candidates, first_ranks)}
    summary = {
        "dataset": data.name, "split": "test", "users": len(examples), "checkpoint": str(checkpoint),
        "chosen_on_validation": chosen,
        "rows": {name: ranking_metrics(r, KS) for name, r in ranks.items()},
        "vs_first_stage": {name: compare([r], [first_ranks]) for name, r in ranks.items() if name != "first_stage"},
        "int8_vs_fp32_logit_correlation": float(np.corrcoef(fp32.ravel(), int8.ravel())[0, 1]),
        "stage_ms": {"candidates": candidates, "p50": float(np.median(seconds) * 1e3),
                     "p99": float(np.quantile(seconds, 0.99) * 1e3)},
    }
    if bundle is not None:
        with phase("served latency with and without the ranking stage", log):
            summary["served_c1"] = served_latency(
                bundle, [[data.item_ids[i] for i in data.sequences[e.user][: e.target_position]]
                         for e in examples[:latency_users]], 10, report)
    report.mkdir(parents=True, exist_ok=True)
    (report / "report.json").write_text(json.dumps(summary, indent=2))
    (report / "report.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    chosen = summary["chosen_on_validation"]
    validation = chosen["validation"]
    lines = [
        f"# Ranking stage: {summary['dataset']}, {summary['users']} test users",
        "",
        f"Chosen on {validation['users']} validation users: weight {chosen['weight']:g} over the first stage's "
        f"best {chosen['candidates']} (validation NDCG@10 {validation['first_stage']:.4f} -> "
        f"{validation['chosen']:.4f}); cross-encoder trained {chosen['training']['steps']} steps on "
        f"{chosen['training']['lists']} lists in {chosen['training']['seconds']:.0f} s. Differences vs the first "
        "stage: "
        f"mean per user, {CONFIDENCE:.0%} paired bootstrap interval, randomization p-value.",
        "",
        "| row | NDCG@10 | Recall@10 | NDCG@50 | Recall@50 | NDCG@10 vs first stage [interval] | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["rows"].items():
        difference = summary["vs_first_stage"].get(name, {}).get("ndcg@10")
        cells = [f"{row[m]:.4f}" for m in ("ndcg@10", "recall@10", "ndcg@50", "recall@50")]
        cells += [f"{difference['mean']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}] "
                  f"p={difference['p_value']:.3g}", f"{difference['ratio']:.3f}"] if difference else ["", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cost = summary["stage_ms"]
    lines += ["", f"INT8 stage, one user's {cost['candidates']} candidates (tokenize + one ONNX run, CPU): "
              f"p50 {cost['p50']:.1f} ms, p99 {cost['p99']:.1f} ms. INT8 vs FP32 logits: correlation "
              f"{summary['int8_vs_fp32_logit_correlation']:.4f}."]
    served = summary.get("served_c1")
    if served:
        off, on = served["first_stage_ms"], served["with_ranking_stage_ms"]
        lines += ["", f"Recommend through llmrec-server, k = {served['k']}, one request at a time, "
                  f"{served['requests_each']} requests each, alternating: first stage p50 {off['p50']:.1f} / p99 "
                  f"{off['p99']:.1f} ms; with the ranking stage p50 {on['p50']:.1f} / p99 {on['p99']:.1f} ms (added "
                  f"p50 {on['p50'] - off['p50']:+.1f} ms, p99 {on['p99'] - off['p99']:+.1f} ms)."]
    return "\n".join(lines) + "\n"


def main(
    data: Path = typer.Option(..., help="data set directory"),
    checkpoint: Path = typer.Option(..., help="a checkpoint with a trained ranking stage"),
    report: Path = typer.Option(..., help="report directory: report.md and report.json"),
    users: int = typer.Option(0, min=0, help="the first N test users (0: all)"),
    bundle: Path | None = typer.Option(None, help="a bundle exported from the checkpoint: also measure Recommend's "
                                                  "latency through a real server with and without the stage"),
) -> None:
    configure_logging()
    run(data, checkpoint, report, users, bundle)
    typer.echo((report / "report.md").read_text())


if __name__ == "__main__":
    typer.run(main)
