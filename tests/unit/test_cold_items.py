from pathlib import Path

import numpy as np

from experiments.cold_items import hold_out
from llmrec.training.data import load_interactions, split_examples, train_sequences

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"


def test_held_out_items_never_reach_training_and_no_target_leaks():
    data = load_interactions(TINY)
    warm, cold = hold_out(data, share=0.25, seed=0)
    assert cold.sum() == int(0.25 * data.num_items) and warm.num_items == data.num_items - cold.sum()
    assert not set(warm.item_ids) & {data.item_ids[i] for i in np.flatnonzero(cold)}
    for user, (full, training) in enumerate(zip(data.sequences, train_sequences(warm))):
        trained_ids = [warm.item_ids[i] for i in training]
        allowed = [data.item_ids[i] for i in full[:-2] if not cold[i]]  # only events before valid and test
        assert trained_ids == allowed[: len(trained_ids)]
        assert len(warm.timestamps[user]) == len(warm.sequences[user])
    assert len(split_examples(data, "test")) == len(data.user_ids)
