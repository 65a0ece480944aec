"""Seconds per training step by --frozen-layers, measured side by side: one model per setting, the same batches,
settings alternated step by step so a noisy machine slows them all alike.

    python -m training.step_time --data ../shared/data/amazon-scientific --frozen-layers 2,4,5
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import typer

from training.config import TrainConfig
from training.data import load_interactions
from training.losses import FullSoftmaxLoss
from training.model import TextRecommender, pretrained_encoder_path
from training.train import build_optimizer, seed_everything, training_examples, training_step, training_user_texts


def main(
    data: Path = typer.Option(..., help="data set directory"),
    frozen_layers: str = typer.Option("2,4,5", help="comma-separated settings; ratios are to the first"),
    steps: int = typer.Option(6, min=2, help="steps per setting; the first warms up and is not counted"),
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


if __name__ == "__main__":
    typer.run(main)
