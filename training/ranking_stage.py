"""The ranking stage: a cross-encoder that reads the user's text and one candidate's text together and re-scores
the first stage's top candidates (llmrec.ranking_stage holds the rule that combines the two scores).

Trained on hard lists: for a user's last training event, the target and `negatives` items drawn from the first
stage's own top candidates for that history (the scoring rule with the checkpoint's adjustments), cross-entropy
over each list. Starts from the packaged all-MiniLM-L6-v2 with a new classification head.

    python -m llmrec.training.ranking_stage --data D --checkpoint C [--steps 1200 --validation-users 1000]

trains it, chooses its weight and candidate count on validation and saves both into C/ranker/, which export
ships (docs/model.md, "Ranking stage").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llmrec.cooccurrence import CooccurrenceTable
from llmrec.fast_user import FastUserMap
from llmrec.ranking_stage import rerank
from llmrec.scoring import ScoringRule, item_rows
from llmrec.template import render_item, render_user
from llmrec.training.calibration import cooccurrence_before, histories
from llmrec.training.checkpoint import CheckpointLayout
from llmrec.training.cli_options import configure_logging
from llmrec.training.config import TrainConfig
from llmrec.training.data import Example, Interactions, load_interactions, split_examples, user_text
from llmrec.training.evaluation import ranking_metrics, target_ranks
from llmrec.training.model import TextRecommender, evaluating, load_item_head, pretrained_encoder_path
from llmrec.training.progress import phase, progress
from llmrec.training.sequence_model import SequenceModel, load_sequence_model
from llmrec.training.train import catalogue_vectors, histories_sequence_vectors, user_vectors

log = logging.getLogger("llmrec.ranking_stage")


@dataclasses.dataclass(frozen=True)
class RankerConfig:
    max_length: int = 128  # tokens of a (user, item) pair; the user side is cut first (its oldest items)
    candidates: int = 20  # the first stage's top candidates re-scored
    negatives: int = 7  # per training list, drawn from the first stage's top `candidates`
    lists_per_step: int = 2
    learning_rate: float = 3e-5
    max_steps: int = 1200  # about 32 minutes on 2 CPU cores
    seed: int = 0


class CrossEncoder(nn.Module):
    """logit(user text, item text): MiniLM reading "[CLS] user [SEP] item [SEP]", its [CLS] state through the
    pooler and a linear head (transformers' BertForSequenceClassification with one label, so that Optimum exports it
    as a text-classification model and quantizes it like the encoder)."""

    def __init__(self, model_path: Path | None = None) -> None:
        super().__init__()
        path = str(model_path or pretrained_encoder_path())
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def tokenize(self, user_texts: Sequence[str], item_texts: Sequence[str], max_length: int) -> dict:
        return self.tokenizer(list(user_texts), list(item_texts), truncation="only_first", max_length=max_length,
                              padding=True, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits.squeeze(-1)

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @torch.no_grad()
    def score(self, user_texts: Sequence[str], item_texts: Sequence[str], max_length: int,
              batch_size: int = 64) -> np.ndarray:
        out = np.empty(len(user_texts), np.float32)
        bar = progress(total=len(user_texts), desc="cross-encoder", unit="pair", logger=log,
                       disable=len(user_texts) <= 16 * batch_size)
        with evaluating(self):
            for start in range(0, len(user_texts), batch_size):
                batch = self.tokenize(user_texts[start:start + batch_size], item_texts[start:start + batch_size],
                                      max_length)
                out[start:start + batch_size] = self(**batch).numpy()
                bar.update(len(batch["input_ids"]))
        bar.close()
        return out


def training_lists(top: np.ndarray, targets: np.ndarray, negatives: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 1 + negatives) item lists, the target first: negatives drawn from each row of `top` (the first stage's
    top candidates, best first) without the target."""
    lists = np.empty((len(targets), 1 + negatives), np.int64)
    for row, (candidates, target) in enumerate(zip(top, targets)):
        others = candidates[candidates != target]
        lists[row, 0] = target
        lists[row, 1:] = rng.choice(others, size=negatives, replace=len(others) < negatives)
    return lists


def train_ranker(model: CrossEncoder, user_texts: Sequence[str], lists: np.ndarray, item_texts: Sequence[str],
                 config: RankerConfig, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Listwise cross-entropy (the target is column 0 of each list) for config.max_steps steps of
    config.lists_per_step lists, cycling through the lists in a seeded order."""
    generator = np.random.default_rng(config.seed)
    order = generator.permutation(len(lists))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * max(0.0, 1.0 - step / config.max_steps))
    width = lists.shape[1]
    losses: list[float] = []
    started = time.perf_counter()
    bar = progress(total=config.max_steps, desc="train the ranking stage", unit="step", logger=log)
    model.train()
    step = 0
    for step in range(config.max_steps):
        if should_stop():
            break
        at = order[(np.arange(config.lists_per_step) + step * config.lists_per_step) % len(order)]
        users = [user_texts[i] for i in at for _ in range(width)]
        items = [item_texts[item] for i in at for item in lists[i]]
        logits = model(**model.tokenize(users, items, config.max_length)).view(len(at), width)
        loss = F.cross_entropy(logits, torch.zeros(len(at), dtype=torch.long))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update(1)
    bar.close()
    model.eval()
    return {"steps": step + 1, "seconds": round(time.perf_counter() - started, 1),
            "loss_first_50": float(np.mean(losses[:50])) if losses else None,
            "loss_last_50": float(np.mean(losses[-50:])) if losses else None}


# --- the first stage, as training and evaluation see it ------------------------------------------------------

RANKER_DIR = "ranker"  # inside the checkpoint: the cross-encoder (save_pretrained) and its settings file
# weight, candidates and max_length, and how they were chosen
RANKER_SETTINGS_FILE = "ranking_stage.json"
WEIGHTS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # the grid the weight is chosen from, on validation
CANDIDATES = (10, 20)  # how many of the first stage's best are re-scored (at most RankerConfig.candidates)


@dataclasses.dataclass
class FirstStage:
    """The checkpoint's scoring rule over its catalogue (llmrec.scoring), dense: what the ranking stage re-scores."""

    data: Interactions
    config: TrainConfig
    rule: ScoringRule
    rows: np.ndarray
    unit: np.ndarray
    table: CooccurrenceTable
    sequence_model: SequenceModel | None
    user_map: FastUserMap | None
    model: TextRecommender

    @classmethod
    def load(cls, data: Interactions, checkpoint: Path, split: str) -> FirstStage:
        """The rule as calibrated, with the co-occurrence table counted before `split`'s targets."""
        head = load_item_head(checkpoint)
        if head is None or not head.calibrated:
            raise ValueError(f"{checkpoint} is not a calibrated training checkpoint")
        layout = CheckpointLayout(checkpoint)
        config = TrainConfig.load(layout.config)
        model = TextRecommender.from_checkpoint(checkpoint)
        with phase("encode the catalogue", log):
            unit = catalogue_vectors(model, data, config).cpu().numpy()
        rows = item_rows(unit, head.item_bias, config.temperature)
        return cls(data, config, ScoringRule(head.adjustments), rows, rows[:, :-1], cooccurrence_before(data, split),
                   load_sequence_model(layout.sequence_model), head.fast_user_map, model)

    def user_texts(self, examples: Sequence[Example]) -> list[str]:
        return [render_user(user_text(self.data, e, self.config.use_context), self.config.max_history_items)
                for e in examples]

    def encoder_users(self, examples: Sequence[Example]) -> np.ndarray:
        """The user tower's vectors (the full path)."""
        return user_vectors(self.model, self.data, list(examples), self.config, desc="encode users")

    def catalogue_users(self, examples: Sequence[Example]) -> np.ndarray:
        """User vectors without the encoder, for mining training lists: the fast path's user map when the checkpoint
        has one, else the normalised history vector."""
        found = histories(self.data, examples)
        if self.user_map is not None:
            return self.user_map.catalogue_user_vectors(self.unit, found)
        vectors = self.rule.history_vectors([self.unit[np.asarray(h, dtype=np.int64)] for h in found],
                                            self.unit.shape[1])
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def top(self, examples: Sequence[Example], users: np.ndarray, n: int,
            chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, scores, target ranks): each example's n best items under the rule, best first, and its target's
        0-based rank over the whole catalogue (users in chunks: bounded memory)."""
        sequences = None if self.sequence_model is None or not self.rule.adjustments.sequence_weight else \
            histories_sequence_vectors(self.sequence_model, self.data, list(examples), self.unit)
        targets = np.array([self.data.sequences[e.user][e.target_position] for e in examples])
        items, scores, ranks = [], [], []
        for start in range(0, len(examples), chunk):
            part = slice(start, start + chunk)
            dense = self.rule.dense_scores(users[part], self.rows, histories(self.data, examples[part]), self.table,
                                           None if sequences is None else sequences[part])
            best = np.argsort(-dense, axis=1, kind="stable")[:, :n]
            items.append(best)
            scores.append(np.take_along_axis(dense, best, axis=1))
            ranks.append(target_ranks(dense, targets[part]))
        return np.concatenate(items), np.concatenate(scores), np.concatenate(ranks)


def reranked_ranks(top: np.ndarray, first: np.ndarray, logits: np.ndarray, targets: np.ndarray, weight: float,
                   candidates: int, first_ranks: np.ndarray) -> np.ndarray:
    """Each target's 0-based rank after the ranking stage re-scores the first `candidates` of its list (rerank);
    targets beyond them keep the first stage's rank (first_ranks)."""
    ranks = np.array(first_ranks, copy=True)
    for row in np.flatnonzero(first_ranks < candidates):
        order, _ = rerank(first[row, :candidates], logits[row, :candidates], weight)
        ranks[row] = int(np.flatnonzero(top[row, :candidates][order] == targets[row])[0])
    return ranks


def choose_stage(top: np.ndarray, first: np.ndarray, logits: np.ndarray, targets: np.ndarray,
                 first_ranks: np.ndarray) -> tuple[float, int, dict]:
    """(weight, candidates) with the best NDCG@10 over the grid (ties to the smaller weight, then fewer candidates:
    the milder stage), and every point of the grid."""
    grid = {}
    for candidates in CANDIDATES:
        for weight in WEIGHTS:
            ranks = reranked_ranks(top, first, logits, targets, weight, candidates, first_ranks)
            grid[f"{weight},{candidates}"] = ranking_metrics(ranks, (10,))["ndcg@10"]
    best = max(grid, key=lambda key: (grid[key], -float(key.split(",")[0]), -int(key.split(",")[1])))
    weight, candidates = best.split(",")
    return float(weight), int(candidates), grid


def pair_logits(model: CrossEncoder, user_texts: Sequence[str], top: np.ndarray, item_texts: Sequence[str],
                max_length: int) -> np.ndarray:
    """(users, n) cross-encoder logits of each user's n first-stage candidates."""
    n = top.shape[1]
    users = [text for text in user_texts for _ in range(n)]
    items = [item_texts[item] for row in top for item in row]
    return model.score(users, items, max_length).reshape(len(user_texts), n)


def train_and_choose(data: Interactions, checkpoint: Path, config: RankerConfig, validation_users: int) -> dict:
    """Train the cross-encoder on lists mined from the first stage, choose its weight and candidate count on the
    first `validation_users` validation users (0: all), and save both into <checkpoint>/ranker/."""
    stage = FirstStage.load(data, checkpoint, "valid")
    item_texts = [render_item(item) for item in data.items]
    examples = [Example(user, len(sequence) - 3) for user, sequence in enumerate(data.sequences)
                if len(sequence) >= 4]  # each user's last training event
    with phase(f"mine {len(examples)} training lists from the first stage", log):
        top, _, _ = stage.top(examples, stage.catalogue_users(examples), config.candidates)
    targets = np.array([data.sequences[e.user][e.target_position] for e in examples])
    lists = training_lists(top, targets, config.negatives, np.random.default_rng(config.seed))
    torch.manual_seed(config.seed)
    model = CrossEncoder()
    training = train_ranker(model, stage.user_texts(examples), lists, item_texts, config)
    valid = split_examples(data, "valid")[: validation_users or None]
    top, first, ranks = stage.top(valid, stage.encoder_users(valid), config.candidates)
    with phase(f"score {len(valid)} validation users' {config.candidates} candidates", log):
        logits = pair_logits(model, stage.user_texts(valid), top, item_texts, config.max_length)
    valid_targets = np.array([data.sequences[e.user][e.target_position] for e in valid])
    weight, candidates, grid = choose_stage(top, first, logits, valid_targets, ranks)
    chosen = {"weight": weight, "candidates": candidates, "max_length": config.max_length,
              "validation": {"users": len(valid), "metric": "ndcg@10", "first_stage": grid[f"0.0,{candidates}"],
                             "chosen": grid[f"{weight},{candidates}"], "grid": grid},
              "training": {**training, "lists": len(lists), "config": dataclasses.asdict(config)}}
    directory = Path(checkpoint) / RANKER_DIR
    model.save(directory)
    (directory / RANKER_SETTINGS_FILE).write_text(json.dumps(chosen, indent=2))
    log.info("ranking stage: weight %g over the first %d candidates, validation NDCG@10 %.4f (first stage %.4f)",
             weight, candidates, chosen["validation"]["chosen"], chosen["validation"]["first_stage"])
    return chosen


def main(
    data: Path = typer.Option(..., help="data set directory"),
    checkpoint: Path = typer.Option(..., help="a calibrated training checkpoint; the ranker is saved into it"),
    steps: int = typer.Option(RankerConfig.max_steps, min=1, help="training steps"),
    validation_users: int = typer.Option(1000, min=0, help="validation users the weight is chosen on (0: all)"),
    seed: int = typer.Option(0),
) -> None:
    configure_logging()
    chosen = train_and_choose(load_interactions(data), checkpoint, RankerConfig(max_steps=steps, seed=seed),
                              validation_users)
    typer.echo(json.dumps({key: chosen[key] for key in ("weight", "candidates", "max_length")}))


if __name__ == "__main__":
    typer.run(main)
