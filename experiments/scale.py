"""Scale benchmark: the `make eval` pipeline (experiments/experiment.py's run_experiment: train, finish, export,
evaluate every row) on a synthetic data set of a given size (experiments/synthetic.py), with the time and the
peak resident memory of every phase. Writes <report>/scale.json and <report>/scale.md (and `make eval`'s own
report in <report>/eval/).

Peak memory per phase: the kernel's peak-RSS mark (VmHWM) is reset as each phase starts (/proc/self/clear_refs,
training/progress.py's phase tracking), so each phase reports its own peak; children (none expected) are reported
from getrusage(RUSAGE_CHILDREN). The phases inside training and finishing are training/train.py's own; those of
the experiment (export, bundle evaluation, SASRec, ...) are timed by wrapping the functions run_experiment calls.

    # the size that once ran out of memory (hours on a 2-core CPU; `make eval` defaults for training)
    python -m experiments.scale --users 50000 --items 17000
    # a quick check of the pipeline and of the benchmark itself (~10 min on 2 busy cores)
    python -m experiments.scale --users 2000 --items 1000 --max-steps 20 --time-budget-minutes 0 \\
        --sequence-minutes 0.5 --sasrec-epochs 2

It also writes an *estimate* of the peak at another size (--estimate-users/--estimate-items, default 50,000 x
17,000) from the chunk sizes the code uses (`estimate_peak`): an estimate, not a measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import typer

from experiments.synthetic import SyntheticConfig, write_dataset
from llmrec.template import render_item
from llmrec.training.calibration import CHUNK_USERS
from llmrec.training.cli_options import configure_logging
from llmrec.training.config import TrainConfig
from llmrec.training.progress import (
    Phase, children_peak_rss_bytes, phase, process_peak_rss_bytes, recorded_phases, track_memory,
)
from llmrec.training.sequence_model import SequenceModelConfig

log = logging.getLogger("llmrec.scale")

MIB = 2**20
DIMENSION = 384  # all-MiniLM-L6-v2
# the functions run_experiment calls (module, attribute, phase name); those a module lacks are left alone
EXPERIMENT_PHASES = (
    ("experiments.experiment", "load_interactions", "load the data set"),
    ("experiments.experiment", "_train_or_reuse", "text model: train (or resume) and finish"),
    ("experiments.experiment", "build_bundle", "export the bundle (ONNX, INT8, HNSW)"),
    ("experiments.experiment", "evaluate_bundle", "evaluate the bundle (INT8, server path)"),
    ("experiments.experiment", "evaluate_without_language_model", "no-LM rows (SASRec, hybrid)"),
    ("experiments.baselines.no_lm", "train_sasrec", "train SASRec"),
    ("experiments.experiment", "evaluate_policies", "evaluate a model-free row"),
    ("experiments.experiment", "write_report", "write the report"),
)


@contextlib.contextmanager
def timed_experiment_phases() -> Iterator[None]:
    """Wrap the functions of EXPERIMENT_PHASES in `phase` while the block runs (restored after it)."""
    import importlib

    originals = []
    for module_name, attribute, name in EXPERIMENT_PHASES:
        module = importlib.import_module(module_name)
        original = getattr(module, attribute, None)
        if original is None:
            log.warning("%s.%s not found: not timed separately", module_name, attribute)
            continue

        def wrapped(*args, _original=original, _name=name, **kwargs):
            with phase(_name, log):
                return _original(*args, **kwargs)

        setattr(module, attribute, functools.wraps(original)(wrapped))
        originals.append((module, attribute, original))
    try:
        yield
    finally:
        for module, attribute, original in originals:
            setattr(module, attribute, original)


def estimate_peak(users: int, items: int, events_per_user: float, item_tokens: float, fixed_bytes: float,
                  config: TrainConfig = TrainConfig(), sequence: SequenceModelConfig = SequenceModelConfig(),
                  sasrec_length: int = 50, sasrec_batch: int = 128, eval_batch: int = 256) -> dict[str, float]:
    """An *estimate* of each stage's peak RSS in bytes at this size: `fixed_bytes` (interpreter, torch, the
    encoder and its optimizer: measured on a small run) plus the largest arrays the stage holds at once, read
    off the code's chunk sizes. Not a measurement: numpy temporaries are counted roughly."""
    f64, f32 = 8, 4
    valid = users  # every user with >= 3 events is a validation user
    history = min(events_per_user - 2, sequence.max_items)  # mean training history length
    vectors = valid * DIMENSION * f32
    # CatalogueEncoder keeps the frozen layers' output of the catalogue (capped at 2 GiB), plus the cached items
    catalogue_cache = min(items * item_tokens * DIMENSION * f32, 2 * 2**30) + items * DIMENSION * f32
    stages = {
        "train the text model": catalogue_cache + config.batch_size * items * f32 * 4,
        # a (batch x positions, items) logits matrix and its softmax gradient, then validation in 512-user chunks
        "train the sequence model": max(sequence.batch_size * history * items * f32 * 3, 512 * items * f32 * 4),
        "encode validation users": 2 * vectors,
        # ScoreTerms: 5 float64 (chunk x items) matrices, ~3 more in combine/target_ranks, the float32 model term;
        # and the stage's ranks: choices x users int64 (810 choices in the first stage)
        "choose the adjustments": 2 * vectors + CHUNK_USERS * items * (8 * f64 + f32) + 810 * valid * f64,
        # per 256-user batch: the float64 item rows, the scores, their negation and argsort; ~6 user-vector sets
        "evaluate": 6 * vectors + items * (DIMENSION + 1) * f64 + eval_batch * items * f64 * 4,
        # SASRec (experiments/baselines/sasrec.py) scores every position of a padded 50-item window:
        # training (batch, 50, items) logits + log-softmax + gradient; evaluation (256, 50, items) per batch
        "SASRec": max(sasrec_batch * sasrec_length * items * f32 * 4, eval_batch * sasrec_length * items * f32 * 2),
    }
    return {name: fixed_bytes + size for name, size in stages.items()}


def _phase_rows(phases: list[Phase]) -> list[dict]:
    return [{"phase": p.name, "depth": p.depth, "seconds": p.seconds, "cpu_seconds": p.cpu_seconds,
             "peak_rss_mib": round(p.peak_rss_bytes / MIB),
             "rss_end_mib": round(p.rss_end_bytes / MIB), "peak_is_own": p.peak_is_own} for p in phases]


def write_scale_report(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    data, run = result["data"], result["run"]
    lines = [
        f"# Scale benchmark: {data['users']:,} users x {data['items']:,} items",
        "",
        f"Synthetic data set (experiments/synthetic.py, seed {data['seed']}): {data['events']:,} events, "
        f"{data['events'] / data['users']:.1f} per user. The `make eval` pipeline (experiments/experiment.py) with "
        f"max_steps={run['config']['max_steps']}, time budget {run['config']['time_budget_minutes']} min, "
        f"sequence model budget {run['sequence']['time_budget_minutes']} min. Machine: {result['machine']}; load "
        f"average {result['load_average'][0]:.1f} at the start, {result['load_average'][1]:.1f} at the end (wall "
        "times stretch with the load; CPU seconds are the process's own, all threads).",
        "",
        f"**Total {result['seconds'] / 60:.1f} min; peak RSS {result['peak_rss_mib']:,} MiB** (the process; "
        f"children: {result['children_peak_rss_mib']:,} MiB). Peaks per phase are "
        + ("each phase's own (the kernel's mark is reset as a phase starts)." if result["peaks_per_phase"]
           else "the process's peak so far (the kernel's mark could not be reset here)."),
        "",
        "| phase | seconds | CPU seconds | peak RSS (MiB) | RSS at end (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["phases"]:
        name = "&nbsp;&nbsp;&nbsp;&nbsp;" * row["depth"] + row["phase"]
        cpu = f"{row['cpu_seconds']:.1f}" if "cpu_seconds" in row else "n/a"
        lines.append(f"| {name} | {row['seconds']:.1f} | {cpu} | {row['peak_rss_mib']:,} | {row['rss_end_mib']:,} |")
    if result.get("rows"):
        lines += ["", "Quality on this synthetic set (deployed policy, test users): a check that models learn "
                      "something, not a benchmark of quality.", "", "| row | recall@10 | ndcg@10 |", "|---|---:|---:|"]
        lines += [f"| {name} | {row['recall@10']:.4f} | {row['ndcg@10']:.4f} |" for name, row in result["rows"].items()]
    estimate = result["estimate"]
    lines += [
        "",
        f"## Estimated peak at {estimate['users']:,} users x {estimate['items']:,} items (an estimate, not measured)",
        "",
        f"From the chunk sizes in the code (experiments/scale.py `estimate_peak`), with the fixed part "
        f"({estimate['fixed_mib']:,} MiB: interpreter, torch, the encoder and its optimizer) measured on this run. "
        f"Calibration scores {CHUNK_USERS} users at a time and evaluation 256, so neither holds a users x items "
        "matrix; what still grows with users is (users x 384) vectors and calibration's per-choice ranks.",
        "",
        "| stage | estimated peak RSS (MiB) |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {mib:,} |" for name, mib in estimate["stages_mib"].items()]
    lines += ["", f"Estimated peak: **{max(estimate['stages_mib'].values()):,} MiB** "
                  f"(the old dense calibration needed ~{estimate['dense_calibration_mib']:,} MiB per users x items "
                  "float64 matrix, several at once)."]
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    return out / "scale.md"


def main(
    users: int = typer.Option(SyntheticConfig.users, min=10),
    items: int = typer.Option(SyntheticConfig.items, min=100),
    events_per_user: float = typer.Option(SyntheticConfig.events_per_user),
    seed: int = typer.Option(0, help="seed of the synthetic data set"),
    max_steps: int = typer.Option(100_000, help="training steps (make eval: 100,000 under its time budget)"),
    time_budget_minutes: float = typer.Option(80.0, help="training time budget (make eval: 80; 0 = none)"),
    sequence_minutes: float = typer.Option(SequenceModelConfig.time_budget_minutes),
    sasrec_epochs: int = typer.Option(0, help="SASRec epochs at most (0 = its default)"),
    eval_users: int = typer.Option(0, help="evaluate on the first N test users (0 = all, as make eval)"),
    work: Path = typer.Option(Path("build/scale"), help="data set, run and bundles go here"),
    report: Path = typer.Option(Path("reports/scale")),
    resume: bool = typer.Option(False, help="keep an earlier run in --work (default: start clean)"),
    estimate_users: int = typer.Option(50_000),
    estimate_items: int = typer.Option(17_000),
) -> None:
    configure_logging()
    from experiments import experiment
    from experiments.baselines.sasrec import SASRecConfig

    peaks_per_phase = track_memory(True)
    started, load_at_start = time.monotonic(), os.getloadavg()[0]
    synthetic = SyntheticConfig(users=users, items=items, events_per_user=events_per_user, seed=seed)
    name = f"synthetic-{users}x{items}-s{seed}"
    data_dir, run_dir, bundle_dir = work / "data" / name, work / "runs" / name, work / "bundles" / name
    if not resume:
        for directory in (run_dir, bundle_dir):
            shutil.rmtree(directory, ignore_errors=True)
    written = data_dir / "synthetic.json"
    if not (written.is_file() and {k: v for k, v in json.loads(written.read_text()).items()
                                   if k in dataclasses.asdict(synthetic)} == dataclasses.asdict(synthetic)):
        with phase("write the synthetic data set", log):
            write_dataset(data_dir, synthetic)
    config = TrainConfig(max_steps=max_steps, time_budget_minutes=time_budget_minutes, eval_users=eval_users)
    sequence = SequenceModelConfig(time_budget_minutes=sequence_minutes)
    fields = {field.name for field in dataclasses.fields(SASRecConfig)}
    sasrec = SASRecConfig(**({"max_epochs": sasrec_epochs} if sasrec_epochs and "max_epochs" in fields else {}))
    with timed_experiment_phases(), phase("make eval pipeline", log):
        summary = experiment.run_experiment(data_dir, run_dir, bundle_dir, report / "eval", 1, config, sasrec,
                                            sequence)
    seconds = time.monotonic() - started
    events = json.loads(written.read_text())["events"]
    phases = recorded_phases()
    # fixed part of the estimate: what the process held once the encoder and its optimizer were alive
    trained = [p for p in phases if p.name == "save the text model"]
    fixed = trained[0].rss_end_bytes if trained else 1.0 * 2**30
    from llmrec.training.data import load_interactions
    data = load_interactions(data_dir)
    item_tokens = min(config.max_item_tokens, sum(len(render_item(i)) for i in data.items) / data.num_items / 3.5)
    stages = estimate_peak(estimate_users, estimate_items, events / users, item_tokens, fixed, config, sequence)
    policies = summary.get("policies", {})
    rows = {name: {k: row[k] for k in ("recall@10", "ndcg@10")}
            for name, row in (policies.get("deployed") or summary.get("evaluation") or {}).items()}
    result = {
        "data": {**dataclasses.asdict(synthetic), "events": events},
        "run": {"config": dataclasses.asdict(config), "sequence": dataclasses.asdict(sequence),
                "sasrec": dataclasses.asdict(sasrec)},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "seconds": round(seconds, 1),
        "load_average": [load_at_start, os.getloadavg()[0]],
        "peak_rss_mib": round(process_peak_rss_bytes() / MIB),
        "children_peak_rss_mib": round(children_peak_rss_bytes() / MIB),
        "peaks_per_phase": peaks_per_phase,
        "phases": _phase_rows(phases),
        "rows": rows,
        "estimate": {"users": estimate_users, "items": estimate_items, "fixed_mib": round(fixed / MIB),
                     "item_tokens": round(item_tokens, 1),
                     "stages_mib": {name: round(size / MIB) for name, size in stages.items()},
                     "dense_calibration_mib": round(estimate_users * estimate_items * 8 / MIB),
                     "note": "an estimate from the code's chunk sizes, not a measurement"},
    }
    path = write_scale_report(result, report)
    typer.echo(path.read_text())


if __name__ == "__main__":
    typer.run(main)
