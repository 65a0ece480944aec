"""The sequence model: a small causal transformer over the item vectors of a user's history (UniSRec/HLLM pattern).

The text model reads only the items that fit its token window (about 4 Amazon titles in 128 tokens); this model
reads the item vectors (text + trained id part, frozen) of up to max_items recent items and learns their order.
Its output lives in the item space and joins the user's query:

    query = user_vector + weight * sequence_vector(item vectors of the recent history)

so scores stay one inner product and the HNSW index searches the query directly. It reads item vectors, never
item ids, so items upserted into a live catalogue take part through their vectors. Trained after the text model
with a full softmax over the frozen catalogue (logits = <output, item> / temperature + the text model's item
bias), every position supervised; the weight is chosen on validation users with the other adjustments
(training/calibration.py; 0 turns it off). export/ writes it as ONNX and the server runs it with onnxruntime.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmrec.training.data import Interactions, split_examples, train_sequences
from llmrec.training.early_stopping import EarlyStopping
from llmrec.training.evaluation import ranking_metrics, target_ranks
from llmrec.training.progress import BoundedProgress

log = logging.getLogger("llmrec.sequence_model")


@dataclasses.dataclass
class SequenceModelConfig:
    max_items: int = 50  # Amazon histories run to 50 items
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    dropout: float = 0.3
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_epochs: int = 200
    time_budget_minutes: float = 6.0
    # Optimizer steps between validation checks (early stopping on validation NDCG@10): counted in steps, not
    # epochs, because an epoch is 66 batches on Amazon Scientific but 8 on MovieLens-100K.
    eval_every_steps: int = 150
    patience: int = 3
    validation_users: int = 3000
    seed: int = 0


class _Block(nn.Module):
    """Pre-norm self-attention and feed-forward, attention written out so that it exports to plain ONNX ops."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(hidden // heads)
        self.attention_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.feed_norm = nn.LayerNorm(hidden)
        self.feed = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(4 * hidden, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        qkv = self.qkv(self.attention_norm(hidden)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = q @ k.transpose(-1, -2) * self.scale
        scores = scores.masked_fill(~allowed[:, None], -1e9)
        attended = (self.dropout(scores.softmax(-1)) @ v).transpose(1, 2).reshape(batch, length, width)
        hidden = hidden + self.dropout(self.attention_out(attended))
        return hidden + self.dropout(self.feed(self.feed_norm(hidden)))


class SequenceModel(nn.Module):
    """(batch, length, dim) item vectors, oldest first and right-aligned (left padding), with a (batch, length)
    validity mask -> (batch, length, dim) vectors predicting the next item at every position.

    Positions count back from the most recent item and padding is masked out of attention, so a sequence scores
    the same padded in a batch or alone (as the server runs it)."""

    def __init__(self, dimension: int, config: SequenceModelConfig) -> None:
        super().__init__()
        self.config = config
        self.project_in = nn.Linear(dimension, config.hidden)
        self.recency = nn.Embedding(config.max_items, config.hidden)
        self.blocks = nn.ModuleList(_Block(config.hidden, config.heads, config.dropout) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden)
        self.project_out = nn.Linear(config.hidden, dimension)
        self.dropout = nn.Dropout(config.dropout)
        nn.init.normal_(self.recency.weight, std=0.02)

    def forward(self, vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        length = vectors.shape[1]
        positions = torch.arange(length, device=vectors.device)
        hidden = self.dropout(self.project_in(vectors) + self.recency(length - 1 - positions))
        causal = positions[None, :] <= positions[:, None]  # (query, key): keys up to the query
        # Each position may attend to itself so that a padded row never softmaxes over nothing.
        allowed = (causal & valid[:, None, :]) | (positions[None, :] == positions[:, None])
        for block in self.blocks:
            hidden = block(hidden, allowed)
        return self.project_out(self.norm(hidden))

    def last(self, vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(batch, dim): the vector after each sequence's most recent item (what serving adds to the query)."""
        return self.forward(vectors, valid)[:, -1]


def padded_histories(histories: Sequence[Sequence[int]], max_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item numbers of each history's max_items most recent items, right-aligned: (rows, valid), -1 where padded."""
    length = max(1, min(max_items, max((len(h) for h in histories), default=1)))
    rows = torch.full((len(histories), length), -1, dtype=torch.long)
    for n, history in enumerate(histories):
        recent = list(history)[-length:]
        if recent:
            rows[n, length - len(recent):] = torch.as_tensor(recent)
    return rows, rows >= 0


def _gather(item_vectors: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return item_vectors[rows.clamp(min=0)] * valid[..., None].to(item_vectors.dtype)


@torch.no_grad()
def sequence_vectors(model: SequenceModel, histories: Sequence[Sequence[int]], item_vectors: np.ndarray,
                     batch_size: int = 512) -> np.ndarray:
    """(len(histories), dim) sequence vectors of item-number histories over (num_items, dim) unit item vectors;
    zeros for an empty history (as llmrec.sequence_runner serves them)."""
    model.eval()
    vectors = torch.as_tensor(np.asarray(item_vectors, dtype=np.float32))
    out = np.zeros((len(histories), vectors.shape[1]), dtype=np.float32)
    for start in range(0, len(histories), batch_size):
        rows, valid = padded_histories(histories[start:start + batch_size], model.config.max_items)
        batch = model.last(_gather(vectors, rows, valid), valid) * valid.any(1, keepdim=True)
        out[start:start + len(rows)] = batch.numpy()
    return out


def validation_ndcg(model: SequenceModel, histories: Sequence[Sequence[int]], targets: np.ndarray,
                    item_vectors: np.ndarray, item_bias: np.ndarray, temperature: float,
                    chunk_users: int = 512) -> float:
    """NDCG@10 of the model as a recommender of its own, scored chunk_users users at a time: memory is one
    (chunk_users, num_items) score matrix, whatever the number of validation users."""
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), chunk_users):
        part = slice(start, start + chunk_users)
        scores = sequence_vectors(model, histories[part], item_vectors) @ item_vectors.T + temperature * item_bias
        ranks[part] = target_ranks(scores, targets[part])
    return ranking_metrics(ranks, (10,))["ndcg@10"]


def train_sequence_model(data: Interactions, item_vectors: np.ndarray, item_bias: np.ndarray, temperature: float,
                         config: SequenceModelConfig = SequenceModelConfig()) -> tuple[SequenceModel, dict]:
    """Train on the training sequences, every position a target, with early stopping on validation NDCG@10.

    item_vectors: (num_items, dim) unit item vectors of the trained text model (frozen); item_bias: its
    (num_items,) bias in logit units, so that served scores are <query, item> + temperature * bias.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    vectors = torch.as_tensor(np.asarray(item_vectors, dtype=np.float32))
    bias = torch.as_tensor(np.asarray(item_bias, dtype=np.float32))
    # Sorted by length so that a batch pads only to its own longest sequence (most histories are short).
    sequences = sorted((s[-(config.max_items + 1):] for s in train_sequences(data) if len(s) >= 2), key=len)
    batches = np.array_split(np.arange(len(sequences)), max(1, len(sequences) // config.batch_size))
    valid_examples = split_examples(data, "valid")[: config.validation_users]
    valid_histories = [data.sequences[e.user][: e.target_position] for e in valid_examples]
    valid_targets = np.array([data.sequences[e.user][e.target_position] for e in valid_examples])

    model = SequenceModel(vectors.shape[1], config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    stopping = EarlyStopping(model, config.patience, config.time_budget_minutes)
    started, epoch, step = time.monotonic(), 0, 0
    shuffled = ((epoch, batch) for epoch in range(1, config.max_epochs + 1) for batch in rng.permutation(len(batches)))
    last_step = config.max_epochs * len(batches)  # a run that ends on its epoch bound ends with a validation check
    model.train()
    bar = BoundedProgress("sequence model", last_step, config.time_budget_minutes, logger=log, started=started)
    for step, (epoch, batch) in enumerate(shuffled, 1):
        rows, valid = padded_histories([sequences[i][:-1] for i in batches[batch]], config.max_items)
        targets, _ = padded_histories([sequences[i][1:] for i in batches[batch]], config.max_items)
        output = model(_gather(vectors, rows, valid), valid)[valid]  # padded positions have no target
        loss = F.cross_entropy(output @ vectors.T / temperature + bias, targets[valid])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(step, f"epoch {epoch}/{config.max_epochs}, loss {loss.item():.3f}")
        if step % config.eval_every_steps == 0 or step == last_step or stopping.out_of_time():
            ndcg = validation_ndcg(model, valid_histories, valid_targets, item_vectors, item_bias, temperature)
            log.info("sequence model step %d (epoch %d) loss %.3f valid ndcg@10 %.4f", step, epoch, loss.item(), ndcg)
            if stopping.should_stop(ndcg):
                break
            model.train()  # sequence_vectors left it in eval mode
    bar.close()
    stopping.restore_best()
    model.eval()
    return model, {"epochs": epoch, "steps": step, "valid_ndcg@10": stopping.best,
                   "seconds": round(time.monotonic() - started, 1)}


def save_sequence_model(model: SequenceModel, path: Path) -> None:
    torch.save({"config": dataclasses.asdict(model.config), "dimension": model.project_in.in_features,
                "state": model.state_dict()}, path)


def load_sequence_model(path: Path) -> SequenceModel | None:
    """The sequence model saved in a checkpoint, or None if it has none."""
    if not Path(path).is_file():
        return None
    saved = torch.load(path, map_location="cpu")
    model = SequenceModel(saved["dimension"], SequenceModelConfig(**saved["config"]))
    model.load_state_dict(saved["state"])
    return model.eval()
