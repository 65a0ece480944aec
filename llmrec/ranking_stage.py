"""The ranking stage (onnxruntime and numpy only): a cross-encoder reads the user's text and a candidate's text
together and re-scores the first stage's best candidates.

    first stage: the scoring rule (llmrec.scoring) ranks the catalogue; its best `candidates` go on
    score(candidate) = first-stage score + weight * cross-encoder logit(user text, candidate text)

The user text is the user tower's (llmrec.template.render_user), the candidate's the item tower's (render_item);
the pair is "[CLS] user [SEP] item [SEP]", cut from the user side (its oldest history items) to max_length tokens.
training/ranking_stage.py trains the cross-encoder and chooses `weight` and `candidates` on validation; export
writes it as model/ranker_int8.onnx; evaluation and the server re-rank through `rerank` and `PairScorer`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

# The ONNX graph's names (Optimum's text-classification export), shared with export/.
PAIR_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "logits"  # (batch, 1) float32


def rerank(first_scores: np.ndarray, logits: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(order, scores): the candidates' positions best first under first-stage score + weight * logit, and those
    scores. Ties keep the first stage's order (a stable sort of candidates given best first)."""
    combined = np.asarray(first_scores, np.float64) + weight * np.asarray(logits, np.float64)
    order = np.argsort(-combined, kind="stable")
    return order, combined[order]


class PairScorer:
    """Cross-encoder logits of (user text, item text) pairs with the exported model, on the CPU.

    Args:
        model_path: the .onnx file (inputs PAIR_INPUTS, output OUTPUT).
        tokenizer_path: the Hugging Face tokenizers JSON file the cross-encoder was trained with.
        max_length: tokens of a pair; the user side is cut first.
        intra_op_threads: threads for one run (0: the cores this process may use).
    """

    def __init__(self, model_path: Path, tokenizer_path: Path, max_length: int, intra_op_threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        if not set(PAIR_INPUTS) <= names:
            raise ValueError(f"{model_path} is not a pair classifier: inputs {sorted(names)}, want {PAIR_INPUTS}")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length, strategy="only_first")
        self.max_length = max_length

    def tokenize(self, user_text: str, item_texts: Sequence[str]) -> dict[str, np.ndarray]:
        """One user with many items -> the model's padded int64 inputs."""
        encodings = self.tokenizer.encode_batch([(user_text, item) for item in item_texts])
        width = max(len(e.ids) for e in encodings)
        feed = {name: np.zeros((len(encodings), width), np.int64) for name in PAIR_INPUTS}
        for row, encoding in enumerate(encodings):
            length = len(encoding.ids)
            feed["input_ids"][row, :length] = encoding.ids
            feed["attention_mask"][row, :length] = 1
            feed["token_type_ids"][row, :length] = encoding.type_ids
        return feed

    def logits(self, user_text: str, item_texts: Sequence[str]) -> np.ndarray:
        """(len(item_texts),) float32 logits of the user against each item (one run)."""
        if not len(item_texts):
            return np.zeros(0, np.float32)
        return self.session.run([OUTPUT], self.tokenize(user_text, item_texts))[0][:, 0]
