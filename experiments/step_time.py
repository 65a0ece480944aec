"""Seconds per training step by --frozen-layers, measured side by side: one model per setting, the same batches,
settings alternated step by step so a noisy machine slows them all alike. Then the catalogue refresh (every
refresh_items_every steps): the whole encoder against CatalogueEncoder's trained top layers, alternated too.

    python -m experiments.step_time --data ../shared/data/amazon-scientific --frozen-layers 2,4,5
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import typer

from llmrec.template import render_item
from llmrec.training.config import TrainConfig
from llmrec.training.data import Interactions, load_interactions
from llmrec.training.losses import FullSoftmaxLoss
from llmrec.training.model import CatalogueEncoder, TextRecommender, pretrained_encoder_path
from llmrec.training.train import build_optimizer, seed_everything, training_examples, training_step, training_user_texts


def main(
    data: Path = typer.Option(..., help="data set directory"),
    frozen_layers: str = typer.Option("2,4,5", help="comma-separated settings; ratios are to the first"),
    steps: int = typer.Option(6, min=2, help="steps per setting; the first warms up and is not counted"),
    refreshes: int = typer.Option(2, min=0, help="catalogue refreshes timed per setting (0: skip)"),
) -> None:
    config = TrainConfig()
    interactions = load_interactions(data)
    examples = training_examples(interactions)
    settings = [int(value) for value in frozen_layers.split(",")]
    seed_everything(config.seed)
    models = {}
    for frozen in settings:
        model = TextRecommender(pretrained_encoder_path(), interactions.num_items, id_dropout=config.id_dropout)
        model.freeze_bottom(frozen)
        model.train()
        models[frozen] = model, build_optimizer(model, config)
    # The catalogue matrix is cached between refreshes in training; its cost is not per step.
    items = torch.nn.functional.normalize(torch.randn(interactions.num_items, models[settings[0]][0].dimension), dim=1)
    loss_fn = FullSoftmaxLoss(config.temperature)
    rng = np.random.default_rng(config.seed)
    seconds: dict[int, list[float]] = {frozen: [] for frozen in settings}
    for step in range(steps):
        batch = [examples[i] for i in rng.integers(0, len(examples), config.batch_size)]
        texts = training_user_texts(interactions, batch, config, rng)
        targets = torch.tensor([interactions.sequences[e.user][e.target_position] for e in batch])
        for frozen, (model, optimizer) in models.items():
            started = time.perf_counter()
            training_step(model, model, optimizer, loss_fn, texts, items, targets, config, bf16=False)
            if step:
                seconds[frozen].append(time.perf_counter() - started)
    base = np.median(seconds[settings[0]])
    typer.echo(f"{interactions.name}, {config.batch_size} users x {config.max_user_tokens} tokens, float32, "
               f"{torch.get_num_threads()} threads, {steps - 1} steps each:")
    for frozen, values in seconds.items():
        typer.echo(f"  frozen_layers={frozen}: median {np.median(values):.2f} s/step, max {np.max(values):.2f}, "
                   f"{np.median(values) / base:.2f}x frozen_layers={settings[0]}")
    if refreshes:
        time_refreshes(models, interactions, config, refreshes, {k: float(np.median(v)) for k, v in seconds.items()})


def time_refreshes(models: dict[int, tuple[TextRecommender, torch.optim.Optimizer]], interactions: Interactions,
                   config: TrainConfig, refreshes: int, step_seconds: dict[int, float]) -> None:
    """Seconds per catalogue refresh, whole encoder vs cached frozen layers, and per step with refreshes included."""
    item_texts = [render_item(item) for item in interactions.items]
    catalogues = {}
    for frozen, (model, _) in models.items():
        started = time.perf_counter()
        catalogues[frozen] = CatalogueEncoder(model, item_texts, config.max_item_tokens)
        typer.echo(f"  frozen_layers={frozen}: frozen layers' output for {len(item_texts)} items kept in "
                   f"{time.perf_counter() - started:.1f} s (once per run)")
    whole: list[float] = []
    cached: dict[int, list[float]] = {frozen: [] for frozen in models}
    for _ in range(refreshes):
        started = time.perf_counter()
        next(iter(models.values()))[0].encode_all(item_texts, config.max_item_tokens)  # same cost for any setting
        whole.append(time.perf_counter() - started)
        for frozen, catalogue in catalogues.items():
            started = time.perf_counter()
            catalogue.encode()
            cached[frozen].append(time.perf_counter() - started)
    every = config.refresh_items_every
    typer.echo(f"catalogue refresh ({len(item_texts)} items x <= {config.max_item_tokens} tokens, median of "
               f"{refreshes}): whole encoder {np.median(whole):.1f} s")
    for frozen, values in cached.items():
        refresh = float(np.median(values))
        per_step_whole = step_seconds[frozen] + np.median(whole) / every
        per_step_cached = step_seconds[frozen] + refresh / every
        typer.echo(f"  frozen_layers={frozen}: cached {refresh:.1f} s ({refresh / np.median(whole):.2f}x); s/step with "
                   f"a refresh every {every} steps: {per_step_whole:.2f} -> {per_step_cached:.2f} "
                   f"({per_step_cached / per_step_whole:.2f}x)")


if __name__ == "__main__":
    typer.run(main)
