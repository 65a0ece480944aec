"""The training checkpoint's file layout: the one place its names are spelled (torch-free).

A training run writes its checkpoint to <run_dir>/checkpoint/ (`checkpoint_dir`), holding `encoder/` (the
fine-tuned MiniLM and its tokenizer, as Hugging Face save_pretrained writes them), `item_head.npz` (catalogue
item ids, the trained id vectors and biases, the chosen score adjustments, the co-occurrence table and the
cold-start map: llmrec.training.model.ItemHead), `train_config.json` (the TrainConfig it was trained with; export reads the
temperature and token limits from it), `sequence_model.pt` (the sequence model over item vectors, absent from
checkpoints saved before it existed) and `training.json` (how the text model was trained: its training settings,
data set and curve; training.train writes the checkpoint as soon as the text model is trained, before the
sequence model and the adjustments, and resumes from it when this record matches). The run's metrics.json sits
beside the checkpoint, in the run directory. Wherever a checkpoint is accepted, a bare pretrained encoder
directory (no item head) is accepted too: `encoder_dir` resolves either to the directory the encoder loads from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

CHECKPOINT_DIR = "checkpoint"
ENCODER_DIR = "encoder"
ITEM_HEAD_FILE = "item_head.npz"
CONFIG_FILE = "train_config.json"
SEQUENCE_MODEL_FILE = "sequence_model.pt"
TRAINING_FILE = "training.json"


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """Paths inside the checkpoint directory `root` (nothing is read or created)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_run(cls, run_dir: Path) -> CheckpointLayout:
        """The checkpoint of the training run in run_dir."""
        return cls(checkpoint_dir(run_dir))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def encoder(self) -> Path:
        return self.root / ENCODER_DIR

    @property
    def item_head(self) -> Path:
        return self.root / ITEM_HEAD_FILE

    @property
    def sequence_model(self) -> Path:
        return self.root / SEQUENCE_MODEL_FILE

    @property
    def training(self) -> Path:
        return self.root / TRAINING_FILE


def checkpoint_dir(run_dir: Path) -> Path:
    """Where the training run in run_dir keeps its checkpoint."""
    return Path(run_dir) / CHECKPOINT_DIR


def encoder_dir(checkpoint: Path) -> Path:
    """A checkpoint keeps its encoder in encoder/; a bare pretrained model directory is the encoder itself."""
    encoder = CheckpointLayout(checkpoint).encoder
    return encoder if encoder.is_dir() else Path(checkpoint)
