"""The cold-start map (llmrec.cold_start): fitted on trained items, chosen by held-out error, applied as one product."""

import numpy as np
import pytest

from llmrec.cold_start import ColdStartMap, fit_cold_start_map

DIM = 6


def trained_items(rng, n=200, noise=0.01):
    """Text vectors and the id vectors and biases a linear rule (plus noise) gives them."""
    text = rng.normal(size=(n, DIM))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    rule = rng.normal(size=(DIM, DIM + 1))
    out = text @ rule + np.arange(DIM + 1) + rng.normal(0, noise, size=(n, DIM + 1))
    return text, out[:, :DIM], out[:, DIM], rule


def test_the_map_recovers_a_linear_rule_and_reports_its_held_out_fit():
    rng = np.random.default_rng(0)
    text, ids, bias, rule = trained_items(rng)
    fit = fit_cold_start_map(text, ids, bias)
    assert fit.items == 200 and fit.id_r2 > 0.99 and fit.bias_r2 > 0.99
    new = rng.normal(size=(5, DIM))
    predicted_ids, predicted_bias = fit.map.predict(new)
    np.testing.assert_allclose(predicted_ids, new @ rule[:, :DIM] + np.arange(DIM), atol=0.05)
    np.testing.assert_allclose(predicted_bias, new @ rule[:, DIM] + DIM, atol=0.05)
    assert predicted_ids.dtype == np.float32 and predicted_bias.shape == (5,)


def test_noise_alone_gets_the_strongest_ridge_and_predicts_about_the_mean():
    rng = np.random.default_rng(1)
    text = rng.normal(size=(100, DIM))
    bias = rng.normal(3.0, 1.0, size=100)  # nothing to learn from the text
    fit = fit_cold_start_map(text, rng.normal(size=(100, DIM)), bias)
    assert fit.bias_alpha == 100.0 and fit.bias_r2 < 0.05
    assert abs(float(fit.map.predict(rng.normal(size=(1, DIM)))[1][0]) - bias.mean()) < 0.5


def test_scaled_maps_scale_only_the_bias():
    rng = np.random.default_rng(2)
    fit = fit_cold_start_map(*trained_items(rng)[:3])
    new = rng.normal(size=(3, DIM)).astype(np.float32)
    ids, bias = fit.map.predict(new)
    scaled_ids, scaled_bias = fit.map.scaled(0.05).predict(new)
    np.testing.assert_allclose(scaled_ids, ids)
    np.testing.assert_allclose(scaled_bias, 0.05 * bias, rtol=1e-5)


def test_bad_maps_and_too_few_items_are_refused():
    with pytest.raises(ValueError, match="square"):
        ColdStartMap(np.zeros((DIM + 1, DIM)))
    with pytest.raises(ValueError, match="finite"):
        ColdStartMap(np.full((DIM + 1, DIM + 1), np.nan))
    with pytest.raises(ValueError, match="at least 10 trained items"):
        fit_cold_start_map(np.zeros((5, DIM)), np.zeros((5, DIM)), np.zeros(5))
