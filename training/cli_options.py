"""What the training command lines share: options that training.train and training.experiment both take, and
their logging setup (export's command line uses it too)."""

from __future__ import annotations

import logging

import typer

from llmrec.training.config import TrainConfig

HISTORY_DROPOUT = typer.Option(TrainConfig.history_dropout, min=0.0, max=1.0,
                               help="share of older history items dropped from each training text")
FROZEN_LAYERS = typer.Option(TrainConfig.frozen_layers, min=0, max=5,  # of 6: the top layer always trains
                             help="bottom encoder layers (and embeddings) kept frozen")


def configure_logging() -> None:
    """Warnings from libraries, progress from llmrec's own loggers."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llmrec").setLevel(logging.INFO)
