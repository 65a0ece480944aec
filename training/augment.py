"""Synthetic queries: teach the user tower to read `context.query`, which logged interactions never carry.

With some probability a training example gets a query derived from its target item (one of its categories,
or a few words of its text), sometimes with the history dropped, so the model learns both to let a query
steer a history and to recommend from a query alone (new users).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llmrec.template import ItemFields, UserText


def synthetic_query(target: ItemFields, rng: np.random.Generator) -> str:
    """A category of the target, or a 2-4 word span of its title when it has no categories."""
    if target.categories:
        return str(rng.choice(target.categories)).lower()
    words = target.title.split()
    length = int(rng.integers(2, 5))
    start = int(rng.integers(0, max(1, len(words) - length + 1)))
    return " ".join(words[start : start + length]).lower()


def with_synthetic_query(
    user: UserText, target: ItemFields, rng: np.random.Generator, query_probability: float, drop_history_probability: float
) -> UserText:
    if rng.random() >= query_probability:
        return user
    context = dataclasses.replace(user.context, query=synthetic_query(target, rng))
    history = [] if rng.random() < drop_history_probability else user.history
    return UserText(history=history, context=context)
