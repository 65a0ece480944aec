"""Training settings: one typed config, saved beside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

from llmrec.scoring import DEFAULT_TEMPERATURE


@dataclasses.dataclass
class TrainConfig:
    """Defaults are chosen to train well on any supported data set, not tuned to one test split."""

    seed: int = 0
    # Model input: long enough for ~10-20 recent items; longer windows cost CPU time linearly.
    max_user_tokens: int = 128
    max_item_tokens: int = 64
    max_history_items: int = 20
    use_context: bool = True  # render time/device/query into the user text
    query_probability: float = 0.2  # share of training examples given a synthetic query (training/augment.py)
    query_only_probability: float = 0.25  # of those, the share whose history is dropped (query-only users)
    # share of older history items dropped from each training text (augment.py); off until an equal-step
    # validation ablation shows it helps (docs/results.md, "Ablations on validation")
    history_dropout: float = 0.0
    # Optimisation
    batch_size: int = 32
    max_steps: int = 300
    time_budget_minutes: float = 0.0  # stop early when spent (0 = no budget)
    encoder_lr: float = 1e-4
    bias_lr: float = 1e-2  # per-item popularity bias: a scalar per item, safe to move fast
    id_lr: float = 5e-4  # per-item id vectors: Adam moves every coordinate ~lr per step, and text vectors'
    # coordinates are ~0.05, so a larger rate lets random id vectors drown the text signal
    weight_decay: float = 0.01
    warmup_steps: int = 20
    temperature: float = DEFAULT_TEMPERATURE  # cosine / temperature: the recipe that works for text retrieval
    id_dropout: float = 0.2  # drop the item-id part so pure text (cold items) stays a good item vector
    refresh_items_every: int = 100  # steps between re-encodings of the catalogue (4k items: 65 s on 2 AVX2 cores)
    bf16: bool = True  # bfloat16 autocast for training steps where it is fast (train.bf16_is_fast); evaluation stays FP32
    frozen_layers: int = 2  # bottom encoder layers (and embeddings) kept frozen: cheaper steps, less drift
    # Evaluation
    eval_batch_size: int = 64
    eval_users: int = 0  # 0 = all users
    # validation users that choose the adjustments (training/calibration.py), 0 = all. On Scientific, choices made
    # on 6,000 validation users beat those made on 3,000 on 2,442 held-out ones (NDCG@50 +.0017/+.0002/+.0001, 3 seeds)
    calibration_users: int = 0
    eval_split: str = "test"  # "valid" when choosing hyperparameters: the test split is for reporting only
    ks: tuple[int, ...] = (10, 50)
    # Settings that decide how a trained text model is finished (adjustments) and evaluated, not how it is trained:
    # a run that differs only in these keeps its text model (training/experiment.py).
    FINISHING_FIELDS: ClassVar[tuple[str, ...]] = ("eval_batch_size", "eval_users", "calibration_users",
                                                   "eval_split", "ks")

    def training_fields(self) -> dict:
        """The settings that decide the trained text model, as JSON-ready values."""
        return {name: value for name, value in json.loads(json.dumps(dataclasses.asdict(self))).items()
                if name not in self.FINISHING_FIELDS}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        data = json.loads(path.read_text())
        data["ks"] = tuple(data.get("ks", (10, 50)))
        return cls(**data)
