"""`make run`'s demo settings: bounded by steps and epochs (never by wall-clock), understood by training.train's
command line, and leaving `make train`'s and `make eval`'s defaults alone."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import typer

from llmrec.template import ItemFields
from llmrec.training.config import TrainConfig
from llmrec.training.data import Interactions
from llmrec.training.sequence_model import SequenceModelConfig, train_sequence_model
from llmrec.training.train import main

MAKEFILE = Path(__file__).parents[2] / "Makefile"


def run_train_args() -> list[str]:
    match = re.search(r"^RUN_TRAIN_ARGS \?= (.*)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, "the Makefile sets RUN_TRAIN_ARGS"
    return shlex.split(match.group(1))


def parsed(args: list[str]) -> dict:
    app = typer.Typer(add_completion=False)
    app.command()(main)
    command = typer.main.get_command(app)
    return command.make_context("train", ["--data", "d", "--out", "o", *args]).params


def test_the_demo_is_bounded_by_steps_and_epochs_not_by_time():
    params = parsed(run_train_args())
    assert 0 < params["max_steps"] < TrainConfig.max_steps
    assert params["time_budget_minutes"] == 0  # a step count, so the demo model is the same on a slow machine
    assert 0 < params["sequence_epochs"] < SequenceModelConfig.max_epochs
    assert 0 < params["calibration_users"] and 0 < params["eval_users"]


def test_make_train_keeps_the_full_defaults():
    params = parsed([])
    assert params["max_steps"] == TrainConfig.max_steps == 300
    assert params["calibration_users"] == TrainConfig.calibration_users == 0
    assert params["eval_users"] == TrainConfig.eval_users == 0
    assert params["sequence_epochs"] == SequenceModelConfig.max_epochs
    assert params["sequence_minutes"] == SequenceModelConfig.time_budget_minutes


def test_a_sequence_model_bounded_by_epochs_ends_with_a_validation_check():
    items = 12
    sequences = [[(start + step) % items for step in range(6)] for start in range(items)]
    data = Interactions("cycle", [str(i) for i in range(items)], [ItemFields(f"t{i}") for i in range(items)],
                        [str(u) for u in range(len(sequences))], sequences)
    vectors = np.random.default_rng(0).normal(size=(items, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    config = SequenceModelConfig(max_items=4, hidden=16, heads=2, layers=1, batch_size=4, max_epochs=1,
                                 eval_every_steps=1000)
    _, info = train_sequence_model(data, vectors, np.zeros(items, np.float32), 0.05, config)
    assert info["epochs"] == 1 and info["steps"] == 3
    assert info["valid_ndcg@10"] >= 0  # checked once at the end (-1 = never checked)
