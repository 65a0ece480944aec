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

# ONNX Runtime session config entries for each spinning policy (see OnnxEncoder).
SPINNING: dict[str | None, dict[str, str]] = {
    None: {},
    "always": {"session.intra_op.allow_spinning": "1"},
    "during-runs": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
    "never": {"session.intra_op.allow_spinning": "0"},
}


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
        spinning: when idle intra-op threads busy-wait for work instead of sleeping: "always" (ONNX Runtime's
            default: also between runs, burning cores that gRPC and Python need), "during-runs" (within a run
            only, stopped as soon as no run is in progress: fast hand-offs between the dozens of parallel
            sections of a run, nothing wasted between requests), "never" (every hand-off wakes a sleeping
            thread). None = ONNX Runtime's default.
        io_binding: run through an IOBinding (inputs copied to the device once, output allocated there);
            None means "on CUDA only". On CPU it gains nothing but exercises the same code path.
        device_id: the GPU for CUDAExecutionProvider.
    """

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 0,
        spinning: str | None = None,
        io_binding: bool | None = None,
        device_id: int = 0,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if spinning not in SPINNING:
            raise ValueError(f"spinning must be one of {sorted(SPINNING)}, got {spinning!r}")
        for key, value in SPINNING[spinning].items():
            options.add_session_config_entry(key, value)
        provider_list = [(p, {"device_id": str(device_id)}) if p == "CUDAExecutionProvider" else p
                         for p in providers]
        self.session = ort.InferenceSession(str(model_path), options, providers=provider_list)
        self._construction = (Path(model_path), Path(tokenizer_path), tuple(providers), spinning, io_binding,
                              device_id)
        self.provider = self.session.get_providers()[0]
        self.intra_op_threads = options.intra_op_num_threads
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._output_name = self.session.get_outputs()[0].name
        on_cuda = self.provider == "CUDAExecutionProvider"
        self.io_binding = on_cuda if io_binding is None else io_binding
        self._device = ("cuda", device_id) if on_cuda else ("cpu", 0)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.dimension = int(self.session.get_outputs()[0].shape[-1])

    def with_threads(self, intra_op_threads: int) -> OnnxEncoder:
        """Another session of the same model with another intra-op thread count. Its vectors are bitwise the
        same: the threads split a run's work (rows and blocks of each matrix product), not its arithmetic."""
        model_path, tokenizer_path, providers, spinning, io_binding, device_id = self._construction
        return OnnxEncoder(model_path, tokenizer_path, providers, intra_op_threads, spinning=spinning,
                           io_binding=io_binding, device_id=device_id)

    def token_ids(self, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
        """Token ids per text, unpadded; texts longer than max_tokens are cut (keeping the closing [SEP])."""
        rows = []
        for encoding in self.tokenizer.encode_batch(list(texts)):
            tokens = encoding.ids
            if len(tokens) > max_tokens:
                tokens = tokens[: max_tokens - 1] + [tokens[-1]]
            rows.append(tokens)
        return rows

    @staticmethod
    def padded_width(length: int, max_tokens: int) -> int:
        """The width a sequence of `length` tokens is padded to: the next multiple of LENGTH_BUCKET, capped."""
        return min(max_tokens, -(-max(length, 1) // LENGTH_BUCKET) * LENGTH_BUCKET)

    def pad(self, rows: Sequence[Sequence[int]], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Token id rows -> ids and attention mask, padded to the bucketed width of the longest row."""
        width = self.padded_width(max(len(r) for r in rows), max_tokens)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask

    def tokenize(self, texts: Sequence[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, padded to a bucketed length; texts longer than max_tokens are cut."""
        return self.pad(self.token_ids(texts, max_tokens), max_tokens)

    def feed(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The model's inputs for (batch, width) token ids and mask (token types all 0 where the model has them)."""
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        return feed

    def encode_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(batch, width) token ids and mask -> (batch, dimension) float32 unit vectors."""
        feed = self.feed(ids, mask)
        hidden = self._run_bound(feed) if self.io_binding else self.session.run(None, feed)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _run_bound(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One run through an IOBinding: inputs copied to the device once, the output allocated on it by
        ONNX Runtime (no host staging buffer), then copied back for pooling."""
        device, device_id = self._device
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, device_id))
        binding.bind_output(self._output_name, device, device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

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
