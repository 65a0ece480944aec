"""The strongest system without a language model, built in the same run as ours: an ID SASRec trained to
convergence, plus the co-occurrence table and a history item score (the research notes: item-to-item statistics
with history demoted are a very strong baseline on Amazon data). Its weights are chosen on validation users by
the code that chooses our model's (training/calibration.py), with SASRec's scores as the model term.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from experiments.baselines.sasrec import SASRecConfig, sasrec_scores, train_sasrec
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.training.calibration import evaluate_policies
from llmrec.training.data import Example, Interactions


@dataclasses.dataclass
class NoLanguageModelRows:
    """Rows "sasrec" (SASRec alone) and "no_lm_hybrid" under each policy, the hybrid's per-user test ranks by
    policy, the weights chosen on validation (RowCalibration.as_json) and how SASRec trained."""

    policies: dict[str, dict[str, dict]]
    hybrid_ranks: dict[str, np.ndarray]
    weights: dict[str, dict]
    sasrec: dict


def evaluate_without_language_model(data: Interactions, config: SASRecConfig, valid: Sequence[Example],
                                    test: Sequence[Example], tables: dict[str, CooccurrenceTable],
                                    ks: Sequence[int]) -> NoLanguageModelRows:
    """Train SASRec (config.seed), then evaluate it alone and as the no-LM hybrid.

    Args:
        valid: the validation users the weights are chosen on (those our model's adjustments are chosen on).
        tables: {"valid": ..., "test": ...}: calibration.cooccurrence_before each split, as our model uses.
    """
    model, training = train_sasrec(data, config)
    scores = sasrec_scores(model, data, config)
    alone, _, alone_weights = evaluate_policies(scores, scores, data, valid, test, ks)
    hybrid, hybrid_ranks, hybrid_weights = evaluate_policies(scores, scores, data, valid, test, ks, tables)
    policies = {policy: {"sasrec": alone[policy], "no_lm_hybrid": hybrid[policy]} for policy in alone}
    return NoLanguageModelRows(policies, hybrid_ranks,
                               {"sasrec": alone_weights.as_json(), "no_lm_hybrid": hybrid_weights.as_json()}, training)
