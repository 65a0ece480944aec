"""The training checkpoint's layout (llmrec.training.checkpoint): the names on disk are a contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmrec.training.checkpoint import CheckpointLayout, checkpoint_dir, encoder_dir


def test_the_names_on_disk():
    layout = CheckpointLayout(Path("runs/ml-100k/checkpoint"))
    assert layout.config == Path("runs/ml-100k/checkpoint/train_config.json")
    assert layout.encoder == Path("runs/ml-100k/checkpoint/encoder")
    assert layout.item_head == Path("runs/ml-100k/checkpoint/item_head.npz")
    assert layout.sequence_model == Path("runs/ml-100k/checkpoint/sequence_model.pt")
    assert checkpoint_dir(Path("runs/ml-100k")) == layout.root
    assert CheckpointLayout.of_run("runs/ml-100k") == layout  # str or Path: the same layout


def test_the_layout_is_frozen():
    with pytest.raises(AttributeError):
        CheckpointLayout(Path("a")).root = Path("b")  # type: ignore[misc]


def test_encoder_dir_is_the_checkpoints_encoder_or_a_bare_pretrained_directory(tmp_path):
    assert encoder_dir(tmp_path) == tmp_path  # a pretrained model directory is the encoder itself
    (tmp_path / "encoder").mkdir()
    assert encoder_dir(tmp_path) == CheckpointLayout(tmp_path).encoder


def test_it_imports_without_torch():
    code = "import sys, llmrec.training.checkpoint; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
