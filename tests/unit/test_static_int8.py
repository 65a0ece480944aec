"""experiments/static_int8.py: the calibration feeds and the metrics it reports."""

import numpy as np
import onnx

from experiments.static_int8 import CalibrationTexts, batch_effect, down_projections, top_k, top_k_agreement
from llmrec import manifest as mf
from llmrec.onnx_encoder import OnnxEncoder
from llmrec.scoring import item_rows
from llmrec.template import render_item


def test_calibration_feeds_are_one_text_per_run_at_its_own_width(tiny_bundle, tiny_catalogue):
    encoder = OnnxEncoder(tiny_bundle / mf.MODEL_FP32_FILE, tiny_bundle / mf.TOKENIZER_FILE, intra_op_threads=1)
    long_text = " ".join(render_item(fields) for _, fields in tiny_catalogue)
    texts = [render_item(tiny_catalogue[0][1]), long_text]
    reader = CalibrationTexts(encoder, [(texts, 64), ([long_text], 128)])
    feeds = [reader.get_next() for _ in range(3)]
    assert reader.get_next() is None
    assert all(set(feed) == {i.name for i in encoder.session.get_inputs()} for feed in feeds)
    short = encoder.padded_width(len(encoder.token_ids(texts[:1], 64)[0]), 64)
    assert short < 64 and [feed["input_ids"].shape for feed in feeds] == [(1, short), (1, 64), (1, 128)]
    # exactly what the server would run for the text alone
    ids, mask = encoder.tokenize([texts[0]], 64)
    assert np.array_equal(feeds[0]["input_ids"], ids) and np.array_equal(feeds[0]["attention_mask"], mask)


def test_batch_effect_measures_the_largest_change_and_bitwise_equal_rows():
    alone = np.eye(4, dtype=np.float32)
    batched = alone.copy()
    assert batch_effect(alone, batched) == {"max_abs_difference": 0.0, "min_cosine": 1.0, "bitwise_equal_share": 1.0}
    batched[1] = [0.0, 0.6, 0.8, 0.0]
    effect = batch_effect(alone, batched)
    assert effect["max_abs_difference"] == np.float32(0.8) and effect["bitwise_equal_share"] == 0.75
    assert np.isclose(effect["min_cosine"], 0.6)


def test_top_k_agreement_over_item_rows():
    rows = item_rows(np.eye(12, dtype=np.float32), np.zeros(12), 1.0)
    users = np.eye(12, dtype=np.float32)[:2] + np.linspace(0, 0.1, 12, dtype=np.float32)
    reference = top_k(users, rows)
    assert reference[0, 0] == 0 and reference[1, 0] == 1 and reference.shape == (2, 10)
    assert top_k_agreement(reference, reference) == {"mean_overlap": 1.0, "same_set_share": 1.0}
    other = reference.copy()
    other[0, -1] = reference[0, -1] + 100  # one item of user 0's top 10 replaced
    assert top_k_agreement(reference, other) == {"mean_overlap": 0.95, "same_set_share": 0.5}


def test_down_projections_are_the_ffn_output_matmuls(tiny_bundle):
    model = onnx.load(str(tiny_bundle / mf.MODEL_FP32_FILE))
    assert down_projections(model) == [f"/encoder/layer.{n}/output/dense/MatMul" for n in range(6)]
