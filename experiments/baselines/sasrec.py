"""SASRec-style ID baseline: a causal transformer over item ids, full softmax cross-entropy at every position.

Trained this way (not with one-negative BCE) it is the strong ID baseline of Klenitskiy & Vasilev (RecSys'23),
and like RecBole's SASRec-CE it trains until validation NDCG@10 stops improving (patience), never against a
clock: a baseline stopped early by a time budget would flatter the model it is compared with. It cannot score
items it never saw in training: that is the point of comparing it on cold targets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmrec.training.data import Example, Interactions, split_examples, train_sequences
from llmrec.training.early_stopping import EarlyStopping
from llmrec.training.evaluation import ScoreFn, evaluate

log = logging.getLogger("llmrec.sasrec")


@dataclasses.dataclass
class SASRecConfig:
    max_length: int = 50
    dimension: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    batch_size: int = 128
    lr: float = 1e-3
    max_epochs: int = 200  # a bound only: training ends when validation stops improving (RecBole: ~50-100 epochs)
    eval_every: int = 2  # epochs between validation checks (early stopping on valid NDCG@10)
    patience: int = 5  # checks without improvement: 10 epochs, RecBole's stopping_step
    seed: int = 0


class SASRec(nn.Module):
    def __init__(self, num_items: int, config: SASRecConfig) -> None:
        super().__init__()
        self.items = nn.Embedding(num_items + 1, config.dimension, padding_idx=0)  # ids shifted by 1; 0 pads
        self.positions = nn.Embedding(config.max_length, config.dimension)
        layer = nn.TransformerEncoderLayer(
            config.dimension, config.heads, 4 * config.dimension, config.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers)
        self.norm = nn.LayerNorm(config.dimension)
        self.dropout = nn.Dropout(config.dropout)
        # Small initial embeddings: the output layer is tied to them, and N(0, 1) would start with huge logits.
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, length) shifted ids, left-padded -> (batch, length, num_items) logits at every position."""
        length = inputs.shape[1]
        hidden = self.items(inputs) * self.items.embedding_dim**0.5 + self.positions(torch.arange(length))
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        # No key-padding mask: fully padded prefixes would softmax over nothing (NaN). Pads carry only their
        # position, and the loss ignores the positions they fill.
        hidden = self.encoder(self.dropout(hidden), mask=causal)
        return self.norm(hidden) @ self.items.weight[1:].T


def _left_pad(sequences: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = list(seq)[-length:]
        if seq:
            out[row, length - len(seq) :] = torch.tensor(seq) + 1
    return out


def sasrec_scores(model: SASRec, data: Interactions, config: SASRecConfig) -> ScoreFn:
    @torch.no_grad()
    def score(examples: Sequence[Example]) -> np.ndarray:
        model.eval()
        histories = [data.sequences[e.user][: e.target_position] for e in examples]
        return model(_left_pad(histories, config.max_length))[:, -1].numpy()

    return score


def train_sasrec(data: Interactions, config: SASRecConfig = SASRecConfig()) -> tuple[SASRec, dict]:
    """Train with early stopping on the validation split; returns the best model and a summary, whose `stopped`
    says whether validation stopped improving ("converged") or max_epochs ended it first."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    sequences = [s[-(config.max_length + 1) :] for s in train_sequences(data) if len(s) >= 2]
    inputs = _left_pad([s[:-1] for s in sequences], config.max_length)
    targets = _left_pad([s[1:] for s in sequences], config.max_length) - 1  # -1 where padded: ignored
    model = SASRec(data.num_items, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    valid = split_examples(data, "valid")
    stopping, started, converged = EarlyStopping(model, config.patience, math.inf), time.monotonic(), False
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        for batch in np.array_split(rng.permutation(len(sequences)), max(1, len(sequences) // config.batch_size)):
            # full softmax cross-entropy over every item at every (unpadded) position
            logits = model(inputs[batch])
            loss = F.cross_entropy(logits.reshape(-1, data.num_items), targets[batch].reshape(-1), ignore_index=-1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % config.eval_every == 0 or epoch == config.max_epochs:  # the last epoch is checked too
            ndcg = evaluate(sasrec_scores(model, data, config), data, valid, ks=(10,))["ndcg@10"]
            log.info("sasrec epoch %d loss %.3f valid ndcg@10 %.4f", epoch, loss.item(), ndcg)
            converged = stopping.should_stop(ndcg)
            if converged:
                break
    stopping.restore_best()
    model.eval()
    return model, {"epochs": epoch, "stopped": "converged" if converged else "max_epochs",
                   "valid_ndcg@10": stopping.best, "seconds": round(time.monotonic() - started, 1)}
