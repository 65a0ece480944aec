"""Runs the exported sequence model (training/sequence_model.py) on histories of item vectors: export evaluation and
the server both score through this class (onnxruntime and numpy only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

# The ONNX graph's names, shared with export/.
VECTORS_INPUT = "vectors"  # (batch, length, dim) float32 unit item vectors, oldest first, right-aligned
VALID_INPUT = "valid"  # (batch, length) bool, False where padded
OUTPUT = "sequence_vector"  # (batch, dim) float32


class SequenceRunner:
    """The sequence model of a bundle, on the CPU: it is a few hundred kFLOPs a history, less than a GPU launch."""

    def __init__(self, model_path: Path, max_items: int, intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.max_items = max_items

    @property
    def dimension(self) -> int:
        return int(self.session.get_inputs()[0].shape[-1])  # only batch and length are dynamic

    def vectors(self, histories: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """(len(histories), dim): each (length, dim) history of unit item vectors, oldest first -> the vector the
        model adds after its most recent max_items items; zeros for an empty history."""
        out = np.zeros((len(histories), self.dimension), dtype=np.float32)
        recent = [np.asarray(h, dtype=np.float32)[-self.max_items:] for h in histories]
        rows = [n for n, h in enumerate(recent) if len(h)]
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            out[batch] = self._run([recent[n] for n in batch])
        return out

    def _run(self, histories: list[np.ndarray]) -> np.ndarray:
        """Non-empty histories, right-aligned into one padded batch."""
        length = max(len(h) for h in histories)
        vectors = np.zeros((len(histories), length, self.dimension), dtype=np.float32)
        valid = np.zeros((len(histories), length), dtype=bool)
        for row, history in enumerate(histories):
            vectors[row, length - len(history):] = history
            valid[row, length - len(history):] = True
        return self.session.run([OUTPUT], {VECTORS_INPUT: vectors, VALID_INPUT: valid})[0]
