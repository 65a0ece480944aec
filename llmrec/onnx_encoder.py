"""Text -> unit vector with the exported ONNX encoder: the one inference path used by export and server."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

# Sequences are padded up to a multiple of this, so ONNX Runtime sees few distinct shapes (warm-up covers them).
LENGTH_BUCKET = 16


def choose_providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA when this onnxruntime build has it and a GPU answers; the CPU otherwise."""
    available = ort.get_available_providers()
    if prefer_gpu and "CUDAExecutionProvider" in available and _gpu_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _gpu_present() -> bool:
    return Path("/dev/nvidia0").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


class OnnxEncoder:
    """Mean-pooled, L2-normalised sentence vectors from an ONNX BERT-style encoder.

    Args:
        model_path: the .onnx file (inputs input_ids, attention_mask[, token_type_ids]; output last_hidden_state).
        tokenizer_path: a Hugging Face tokenizers JSON file.
        providers: ONNX Runtime execution providers, in order of preference.
        intra_op_threads: threads for one run; size it to the cores the process really has.
    """

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 0,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(model_path), options, providers=list(providers))
        self.provider = self.session.get_providers()[0]
        self._input_names = {i.name for i in self.session.get_inputs()}
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.dimension = int(self.session.get_outputs()[0].shape[-1])

    def tokenize(self, texts: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, padded to a bucketed length; texts longer than max_tokens are cut."""
        encodings = self.tokenizer.encode_batch(list(texts))
        lengths = [min(len(e.ids), max_tokens) for e in encodings]
        width = min(max_tokens, -(-max(lengths) // LENGTH_BUCKET) * LENGTH_BUCKET)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, (encoding, length) in enumerate(zip(encodings, lengths)):
            tokens = encoding.ids[:length]
            if length < len(encoding.ids):  # keep the closing [SEP] a truncated text would lose
                tokens = tokens[:-1] + [encoding.ids[-1]]
            ids[row, :length] = tokens
            mask[row, :length] = 1
        return ids, mask

    def encode_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(batch, width) token ids and mask -> (batch, dimension) float32 unit vectors."""
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feed)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def encode(self, texts: Sequence[str], max_tokens: int, batch_size: int = 64) -> np.ndarray:
        """Texts -> (len(texts), dimension) unit vectors, batched by similar length."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        order = np.argsort([len(t) for t in texts])
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self.encode_tokens(*self.tokenize([texts[i] for i in rows], max_tokens))
        return out
