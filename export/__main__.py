"""`python -m llmrec.export`: turn a training checkpoint into a served bundle."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from llmrec.export.bundle import build_bundle
from llmrec.training.checkpoint import CheckpointLayout
from llmrec.training.cli_options import configure_logging
from llmrec.training.config import TrainConfig
from llmrec.training.data import load_interactions, split_examples, user_text

_VALIDATION_USERS = 300


def main(
    checkpoint: Path = typer.Option(..., help="training checkpoint directory (runs/<data>/checkpoint)"),
    data: Path = typer.Option(..., help="the data set: its catalogue is embedded and indexed"),
    out: Path = typer.Option(Path("bundles"), help="bundles are written to OUT/<bundle_version>/"),
    check_quality: bool = typer.Option(True, help="fail if INT8 drifts from PyTorch beyond the thresholds"),
) -> None:
    configure_logging()
    config_path = CheckpointLayout(checkpoint).config
    config = TrainConfig.load(config_path) if config_path.is_file() else TrainConfig()
    interactions = load_interactions(data)
    validation = [user_text(interactions, e, config.use_context) for e in split_examples(interactions, "valid")]
    metrics_path = checkpoint.parent / "metrics.json"
    training_info = {"dataset": interactions.name}
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        training_info.update({k: metrics[k] for k in ("config", "train_seconds", "steps", "evaluation")})
    bundle = build_bundle(
        checkpoint,
        list(zip(interactions.item_ids, interactions.items)),
        out,
        max_user_tokens=config.max_user_tokens,
        max_item_tokens=config.max_item_tokens,
        max_history_items=config.max_history_items,
        validation_users=validation[:_VALIDATION_USERS],
        check_quality=check_quality,
        training_info=training_info,
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    typer.echo(f"bundle: {bundle}\nquality: {json.dumps(manifest['quality'], indent=2)}")


if __name__ == "__main__":
    typer.run(main)
