from pathlib import Path

import numpy as np

from experiments.cold_items import boosted_ranks, hold_out, validation_bundle
from llmrec import manifest as mf
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.item_record import read_items
from llmrec.training.calibration import cooccurrence_before
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


def test_the_validation_bundle_is_the_served_one_with_the_table_counted_before_validation(tiny_bundle, tmp_path):
    warm, _ = hold_out(load_interactions(TINY), share=0.0, seed=0)  # every item: the tiny bundle serves them all
    valid = validation_bundle(tmp_path, warm, tiny_bundle)
    served, manifest = mf.read_manifest(tiny_bundle), mf.read_manifest(valid)  # every file's sha256 checked
    assert valid.parent == tmp_path / "valid-bundles" and manifest.bundle_version != served.bundle_version
    assert {f for f in served.files if manifest.files[f] != served.files[f]} == {mf.COOCCURRENCE_FILE}

    def pairs(table: CooccurrenceTable, ids: list[str]) -> list[tuple[str, str, float]]:
        rows, cols, counts = table.counts()
        return sorted(zip([ids[r] for r in rows], [ids[c] for c in cols], counts.tolist()))

    want = pairs(cooccurrence_before(warm, "valid"), warm.item_ids)
    served_ids = [item_id for item_id, _ in read_items(valid / mf.ITEMS_FILE)]
    assert want and pairs(CooccurrenceTable.load(valid / mf.COOCCURRENCE_FILE), served_ids) == want
    assert validation_bundle(tmp_path, warm, tiny_bundle).parent == valid.parent  # a rerun replaces it
    assert len(list(valid.parent.iterdir())) == 1


def test_boosted_ranks_merge_the_served_lists_as_a_server_with_the_boost_would_rank():
    """From each user's top 50 and top 50 new items, the ranks under a boost are those of the whole catalogue
    scored with the boost added to every new item."""
    rng = np.random.default_rng(3)
    items, users = 400, 60
    cold = np.zeros(items, dtype=bool)
    cold[rng.choice(items, 80, replace=False)] = True
    scores = rng.normal(size=(users, items)) + np.where(cold, -1.0, 0.0)  # new items score lower, as served
    targets_of = rng.integers(0, items, size=users)
    lists = []
    for row in scores:
        best = np.argsort(-row, kind="stable")
        lists.append(([(int(i), float(row[i])) for i in best[:50]],
                      [(int(i), float(row[i])) for i in best[cold[best]][:50]]))
    for boost in (0.0, 0.5, 1.0, 3.0, 100.0):
        boosted = scores + boost * cold
        want = np.full(users, 10)
        for user, row in enumerate(boosted):
            top = list(np.argsort(-row, kind="stable")[:10])
            if targets_of[user] in top:
                want[user] = top.index(targets_of[user])
        assert boosted_ranks(lists, cold, targets_of, boost).tolist() == want.tolist()
    listed = boosted_ranks(lists, cold, targets_of, 100.0) < 10  # a boost past every gap: only new items listed
    assert not listed[~cold[targets_of]].any()
