"""Softmax cross-entropy of each user against the whole catalogue (never one-negative BCE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmrec.scoring import DEFAULT_TEMPERATURE


class FullSoftmaxLoss(nn.Module):
    """Cross-entropy over all items, logits = <user, item> / temperature + item_bias.

    Every catalogue item, the user's own history included, is a negative: this is what teaches a text model
    not to recommend what the user just read about (in-batch negatives never show it those).

    Inputs:
        users (batch, dim) unit vectors; items (num_items, dim) unit vectors; bias (num_items,);
        targets (batch,) item numbers.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, users: torch.Tensor, items: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(users, items, bias), targets)

    def logits(self, users: torch.Tensor, items: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return users @ items.T / self.temperature + bias  # (batch, num_items)

    def get_config_dict(self) -> dict[str, float]:
        return {"temperature": self.temperature}
