"""The fast path's user map (llmrec.fast_user): features of the history's item vectors -> the encoder's user vector."""

import numpy as np
import pytest

from llmrec import fast_user
from llmrec.fast_user import FEATURE_RECENCIES, FastUserMap

DIM = 6


def unit_rows(rng, n):
    rows = rng.normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_features_are_the_normalised_decayed_sums_of_the_most_recent_items():
    rng = np.random.default_rng(0)
    history = unit_rows(rng, 7)  # oldest first
    out = fast_user.features([history], DIM)[0]
    assert out.shape == (len(FEATURE_RECENCIES) * DIM + 1,) and out[-1] == 1.0
    for n, (recent, decay) in enumerate(FEATURE_RECENCIES):
        latest_first = history[::-1][:recent]
        summed = (decay ** np.arange(len(latest_first))) @ latest_first
        np.testing.assert_allclose(out[n * DIM : (n + 1) * DIM], summed / np.linalg.norm(summed), rtol=1e-5)
    np.testing.assert_allclose(out[:DIM], history[-1], rtol=1e-6)  # the first block is the latest item


def test_an_empty_history_or_a_deleted_latest_item_gives_zero_blocks_not_nan():
    history = np.zeros((1, DIM), np.float32)  # the only item was deleted since: a zero row
    out = fast_user.features([history, np.zeros((0, DIM), np.float32)], DIM)
    assert np.isfinite(out).all() and (out[:, :-1] == 0).all()


def test_catalogue_features_read_only_the_recent_items_in_chunks():
    rng = np.random.default_rng(1)
    unit = unit_rows(rng, 40)
    histories = [rng.integers(0, 40, size=rng.integers(1, 35)) for _ in range(9)]
    chunked = fast_user.catalogue_features(unit, histories, chunk_users=4)
    np.testing.assert_array_equal(chunked, fast_user.features([unit[h] for h in histories], DIM))
    user_map = FastUserMap(rng.normal(size=(len(FEATURE_RECENCIES) * DIM + 1, DIM)).astype(np.float32))
    np.testing.assert_allclose(user_map.catalogue_user_vectors(unit, histories),
                               user_map.user_vectors([unit[h] for h in histories]), rtol=1e-5, atol=1e-6)


def test_the_fit_recovers_a_linear_map_and_predicts_held_out_users():
    rng = np.random.default_rng(2)
    histories = [unit_rows(rng, int(rng.integers(1, 25))) for _ in range(400)]
    inputs = fast_user.features(histories, DIM)
    truth = rng.normal(size=(inputs.shape[1], DIM)).astype(np.float32)
    fit = fast_user.fit(inputs, inputs @ truth + rng.normal(scale=0.01, size=(400, DIM)))
    assert fit.alpha == min(fast_user.ALPHAS) and fit.held_out_r2 > 0.99
    assert fit.map.dimension == DIM and fit.map.items_read == 20
    np.testing.assert_allclose(fit.map.user_vectors(histories), inputs @ truth, atol=0.05)
    # held-out predictions come from maps fitted without those users: worse than the in-sample fit, yet close
    assert np.abs(fit.held_out - inputs @ truth).mean() < 0.05
    assert fit.as_json()["users"] == 400


@pytest.mark.parametrize("shape", [(DIM, DIM), (len(FEATURE_RECENCIES) * DIM, DIM),
                                   ((len(FEATURE_RECENCIES) + 1) * DIM + 1, DIM)])
def test_a_map_of_another_shape_or_not_finite_is_refused(shape):
    with pytest.raises(ValueError, match="fast-path user map"):
        FastUserMap(np.zeros(shape, np.float32))
    weights = np.zeros((len(FEATURE_RECENCIES) * DIM + 1, DIM), np.float32)
    weights[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        FastUserMap(weights)
