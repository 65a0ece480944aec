"""Early stopping keeps the best state by the validation metric and stops on patience or time."""

import torch
from torch import nn

from llmrec.training.early_stopping import EarlyStopping


def test_it_stops_after_patience_checks_without_improvement_and_restores_the_best_state():
    model = nn.Linear(2, 1)
    stopping = EarlyStopping(model, patience=2, time_budget_minutes=10)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert not stopping.should_stop(0.5)
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert not stopping.should_stop(0.4)  # one check without improvement
    assert stopping.should_stop(0.5)  # equal is no improvement: patience spent
    stopping.restore_best()
    assert stopping.best == 0.5 and torch.all(model.weight == 1.0)


def test_a_spent_time_budget_stops_at_the_next_check():
    stopping = EarlyStopping(nn.Linear(2, 1), patience=100, time_budget_minutes=0)
    assert stopping.out_of_time() and stopping.should_stop(1.0) and stopping.best == 1.0
