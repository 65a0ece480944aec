"""Early stopping for the small models trained beside the text model (the sequence model, SASRec)."""

from __future__ import annotations

import time

from torch import nn


class EarlyStopping:
    """Keeps the model state with the best validation metric; stop when `patience` checks in a row bring no
    improvement, or when the time budget is spent (the best state so far is kept either way)."""

    def __init__(self, model: nn.Module, patience: int, time_budget_minutes: float) -> None:
        self.model = model
        self.patience = patience
        self.deadline = time.monotonic() + time_budget_minutes * 60
        self.best = -1.0
        self._best_state: dict | None = None
        self._stale = 0

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def should_stop(self, metric: float) -> bool:
        """Record one validation check; True when training should end."""
        if metric > self.best:
            self.best, self._stale = metric, 0
            self._best_state = {key: value.clone() for key, value in self.model.state_dict().items()}
        else:
            self._stale += 1
        return self._stale >= self.patience or self.out_of_time()

    def restore_best(self) -> None:
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
