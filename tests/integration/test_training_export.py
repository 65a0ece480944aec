"""Train a few steps on the tiny data set, export a bundle from the checkpoint and check what it holds."""

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load_file

from llmrec.export.bundle import build_bundle
from llmrec.export.validate import QualityCheckFailed, compare
from llmrec import manifest as layout
from llmrec.cold_start import ColdStartMap
from llmrec.manifest import BundleError, read_manifest
from llmrec.onnx_encoder import OnnxEncoder
from llmrec.scoring import DEFAULT_TEMPERATURE
from llmrec.ranking_stage import PairScorer
from llmrec.template import TEMPLATE_VERSION, UserText, render_item, render_user
from llmrec.training.checkpoint import CheckpointLayout
from llmrec.training.config import TrainConfig
from llmrec.training.data import item_popularity, load_interactions, split_examples, user_text
from llmrec.training.evaluation import cold_items
from llmrec.training.model import TextRecommender, load_item_head, pretrained_encoder_path
from llmrec.training.ranking_stage import (
    CANDIDATES, RANKER_DIR, RANKER_SETTINGS_FILE, WEIGHTS, RankerConfig, train_and_choose,
)
from llmrec.training.sequence_model import load_sequence_model, sequence_vectors
from llmrec.training.train import train
from llmrec.server.bundle import LoadedBundle
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    data = load_interactions(TINY)
    metrics = train(data, TrainConfig(max_steps=4, batch_size=8, refresh_items_every=2, eval_users=20), out)
    return data, out, metrics


@pytest.fixture(scope="module")
def trained_bundle(trained_run, tmp_path_factory):
    data, out, metrics = trained_run
    validation = [user_text(data, e) for e in split_examples(data, "valid")]
    return build_bundle(CheckpointLayout.of_run(out).root, list(zip(data.item_ids, data.items)), tmp_path_factory.mktemp("bundles"),
                        validation_users=validation, training_info={"evaluation": metrics["evaluation"]})


def test_training_writes_a_checkpoint_and_evaluates_beside_baselines(trained_run):
    data, out, metrics = trained_run
    checkpoint = CheckpointLayout.of_run(out)
    assert (checkpoint.encoder / "model.safetensors").is_file()
    head = np.load(checkpoint.item_head)
    assert head["id_embedding"].shape == (data.num_items, 384)
    assert np.abs(head["id_embedding"]).sum() > 0  # id vectors start at zero: the head was trained
    popularity = np.log(item_popularity(data) + 1.0)
    assert np.corrcoef(head["item_bias"], popularity)[0, 1] > 0.9  # bias starts at log-popularity
    assert [m["step"] for m in metrics["curve"]] == [1, 2, 3, 4]
    assert set(metrics["evaluation"]) == {"popularity", "zero_shot", "sequence_model_alone", "llmrec",
                                          "llmrec_without_context"}
    assert checkpoint.sequence_model.is_file() and metrics["sequence_model"]["epochs"] >= 1
    for result in metrics["evaluation"].values():
        assert 0 <= result["ndcg@10"] <= result["recall@10"] <= result["recall@50"] <= 1
        assert result["examples"] == 20
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_training_keeps_the_frozen_bottom_of_the_encoder_pretrained(trained_run):
    _, out, metrics = trained_run
    frozen = metrics["config"]["frozen_layers"]
    pretrained = load_file(pretrained_encoder_path() / "model.safetensors")
    trained = load_file(CheckpointLayout.of_run(out).encoder / "model.safetensors")

    def unchanged(prefix: str) -> bool:
        names = [name for name in trained if name.startswith(prefix)]  # weights; buffers are not saved
        assert names, prefix
        return all(np.array_equal(pretrained[name], trained[name]) for name in names)

    assert 0 < frozen < 6  # all-MiniLM-L6-v2: 6 layers
    assert unchanged("embeddings.") and all(unchanged(f"encoder.layer.{i}.") for i in range(frozen))
    assert not any(unchanged(f"encoder.layer.{i}.") for i in range(frozen, 6))


def test_bundle_is_complete_verified_and_self_describing(trained_bundle):
    manifest = read_manifest(trained_bundle)
    assert manifest.template_version == TEMPLATE_VERSION
    assert manifest.item_count == 42 and manifest.index_dimension == manifest.dimension + 1 == 385
    assert manifest.quality["int8_vs_pytorch"]["mean_cosine"] >= 0.98
    assert manifest.quality["hnsw_recall@10"] >= 0.99
    assert manifest.versions["onnxruntime-gpu"] != "absent"
    assert manifest.sequence_model is not None and layout.SEQUENCE_MODEL_FILE in manifest.files
    assert trained_bundle.name == manifest.bundle_version
    assert "llmrec" in manifest.training["evaluation"]


def test_served_item_vectors_are_the_fp32_encoder_plus_the_trained_head(trained_bundle, trained_run):
    data, out, _ = trained_run
    manifest = read_manifest(trained_bundle)
    encoder = OnnxEncoder(trained_bundle / layout.MODEL_FP32_FILE, trained_bundle / layout.TOKENIZER_FILE)
    text = encoder.encode([render_item(data.items[0])], manifest.max_item_tokens)[0]
    head = np.load(CheckpointLayout.of_run(out).item_head)
    expected = text + head["id_embedding"][0]
    expected /= np.linalg.norm(expected)
    row = np.load(trained_bundle / layout.VECTORS_FILE)[0]
    # The catalogue is encoded in batches: at FP32 an item's vector does not depend on the texts beside it.
    np.testing.assert_allclose(row[:-1], expected, atol=1e-5)
    int8 = OnnxEncoder(trained_bundle / layout.MODEL_INT8_FILE, trained_bundle / layout.TOKENIZER_FILE)
    int8_text = int8.encode([render_item(data.items[0])], manifest.max_item_tokens)[0]
    assert np.abs(int8_text - text).max() > 1e-4  # not the INT8 encoder: the check above can tell them apart
    assert row[-1] == pytest.approx(DEFAULT_TEMPERATURE * head["item_bias"][0], rel=1e-5)


def test_a_tampered_bundle_is_refused(trained_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_bundle, copy)
    with (copy / layout.VECTORS_FILE).open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x7f")
    with pytest.raises(BundleError, match="sha256"):
        read_manifest(copy)
    (copy / layout.INDEX_FILE).unlink()
    with pytest.raises(BundleError, match="lacks"):
        read_manifest(copy, verify_hashes=False)
    shutil.copy(trained_bundle / layout.INDEX_FILE, copy / layout.INDEX_FILE)
    (copy / layout.SEQUENCE_MODEL_FILE).unlink()
    with pytest.raises(BundleError, match="lacks model/sequence_model.onnx"):
        read_manifest(copy, verify_hashes=False)
    shutil.copy(trained_bundle / layout.SEQUENCE_MODEL_FILE, copy / layout.SEQUENCE_MODEL_FILE)
    (copy / layout.COLD_START_FILE).unlink()
    with pytest.raises(BundleError, match="lacks model/cold_start.npy"):
        read_manifest(copy, verify_hashes=False)


def test_the_bundle_serves_the_checkpoints_sequence_model(trained_bundle, trained_run):
    data, out, _ = trained_run
    bundle = LoadedBundle.load(trained_bundle, prefer_gpu=False)
    model = load_sequence_model(CheckpointLayout.of_run(out).sequence_model)
    items = np.asarray(bundle.vectors)[:, : bundle.manifest.dimension]  # bundle rows are the data's items here
    histories = [data.sequences[user][:-2] for user in range(6)]
    np.testing.assert_allclose(bundle.sequence_model.vectors([items[h] for h in histories]),
                               sequence_vectors(model, histories, items), atol=1e-5)


def test_the_bundle_serves_the_checkpoints_fast_path_user_map(trained_bundle, trained_run):
    data, out, metrics = trained_run
    head = load_item_head(CheckpointLayout.of_run(out).root)
    assert head.fast_adjustments is not None and head.fast_user_map is not None
    fit = metrics["fast_path"]["user_map"]
    assert fit["users"] == len(split_examples(data, "valid"))
    manifest = read_manifest(trained_bundle)
    assert manifest.fast_path.user_map and layout.FAST_USER_MAP_FILE in manifest.files
    bundle = LoadedBundle.load(trained_bundle, prefer_gpu=False)
    np.testing.assert_array_equal(bundle.fast_user_map.weights, head.fast_user_map.weights)


def test_training_gives_items_never_a_target_the_cold_start_maps_prediction(trained_run):
    data, out, metrics = trained_run
    head = load_item_head(CheckpointLayout.of_run(out).root)
    assert head.cold_start is not None and metrics["cold_start"]["items"] == int((~cold_items(data)).sum())
    untrained = np.flatnonzero(cold_items(data))
    assert len(untrained)  # the tiny data set has items that are only ever the first of a sequence
    model = TextRecommender.from_checkpoint(CheckpointLayout.of_run(out).root)
    text = model.encode_all([render_item(data.items[i]) for i in untrained], TrainConfig.max_item_tokens).numpy()
    ids, bias = head.cold_start.predict(text)
    np.testing.assert_allclose(head.id_embedding[untrained], ids, atol=1e-4)
    np.testing.assert_allclose(head.item_bias[untrained], bias, atol=1e-4)


SPACE_FAN = ["m4", "m5", "m1", "m2", "m3", "m7"]  # Star Wars, Alien, Star Trek
COMEDY_FAN = ["m13", "m14", "m15", "m16", "m17", "m20"]  # Groundhog Day, Airplane!, The Naked Gun, ...
NEW_FILM = pb.CatalogueItem(item_id="new-interstellar", text=pb.ItemText(
    title="Interstellar (2014)", categories=["Adventure", "Drama", "Sci-Fi", "Space"],
    description="Astronauts travel through a wormhole near Saturn in search of a new home for humanity."))


def test_a_new_item_reaches_the_users_who_want_it_through_the_real_server(trained_bundle, serve_bundle, tmp_path):
    """UpsertItems gives a new film the id vector and bias the bundle's cold-start map predicts from its text (one
    encode, no retraining); it then reaches the top 10 of a space-film fan and stays out of a comedy fan's, unless
    the request reserves a share of the list for new items."""
    manifest = read_manifest(trained_bundle)
    assert manifest.cold_start_map and layout.COLD_START_FILE in manifest.files
    server = serve_bundle(trained_bundle, state_dir=tmp_path)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        assert stub.UpsertItems(pb.UpsertItemsRequest(items=[NEW_FILM]), timeout=60).created == 1
        text = np.array(stub.Embed(pb.EmbedRequest(items=[NEW_FILM.text]), timeout=30).items[0].values)
        ids, bias = ColdStartMap(np.load(trained_bundle / layout.COLD_START_FILE)).predict(text[None, :])
        row = np.array(stub.GetItem(pb.GetItemRequest(item_id=NEW_FILM.item_id, include_vector=True),
                                    timeout=10).vector.values)
        expected = (text + ids[0]) / np.linalg.norm(text + ids[0])
        np.testing.assert_allclose(row[:-1], expected, atol=1e-5)
        assert row[-1] == pytest.approx(bias[0], rel=1e-5)

        def top10(history, **request):
            response = stub.Recommend(pb.RecommendRequest(
                history=[pb.HistoryItem(item_id=i) for i in history], k=10, exclude_history=True, **request),
                timeout=30)
            return [item.item_id for item in response.items]

        assert NEW_FILM.item_id in top10(SPACE_FAN)
        comedy = top10(COMEDY_FAN)
        assert NEW_FILM.item_id not in comedy
        fresh = top10(COMEDY_FAN, new_item_share=0.1)  # one slot of ten for new items
        assert fresh == comedy[:9] + [NEW_FILM.item_id]
        with pytest.raises(grpc.RpcError) as error:
            top10(COMEDY_FAN, new_item_share=1.5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "new_item_share must be between 0 and 1" in error.value.details()


def test_quality_gate_fails_loudly_on_a_drifted_model():
    rng = np.random.default_rng(0)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    users, items = unit(rng.normal(size=(30, 16))), unit(rng.normal(size=(50, 16)))
    score = lambda u, i: u @ i.T  # noqa: E731
    assert compare(users, items, users, items, score)["top10_overlap"] == 1.0
    with pytest.raises(QualityCheckFailed, match="cosine"):
        compare(users, items, unit(rng.normal(size=(30, 16))), items, score)


def test_the_ranking_stage_trains_exports_and_re_scores_served_lists(trained_run, serve_bundle, tmp_path):
    """training/ranking_stage.py trains a cross-encoder on lists mined from the first stage and saves it with its
    validation choice into the checkpoint; export ships it as INT8 and the server re-scores the first stage's list
    with it when asked: score = first-stage score + weight * logit, in that order, for every returned item."""
    data, out, _ = trained_run
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(CheckpointLayout.of_run(out).root, checkpoint)  # the module's bundle stays without a ranker
    chosen = train_and_choose(data, checkpoint, RankerConfig(max_steps=2, lists_per_step=1, negatives=3), 10)
    assert chosen["weight"] in WEIGHTS and chosen["candidates"] in CANDIDATES and chosen["training"]["steps"] == 2
    settings = checkpoint / RANKER_DIR / RANKER_SETTINGS_FILE
    settings.write_text(json.dumps({**chosen, "weight": 1.0, "candidates": 10}))  # a stage whose logits count
    validation = [user_text(data, e) for e in split_examples(data, "valid")]
    bundle_dir = build_bundle(checkpoint, list(zip(data.item_ids, data.items)), tmp_path / "bundles",
                              validation_users=validation)
    manifest = read_manifest(bundle_dir)
    assert (manifest.ranking_stage.weight, manifest.ranking_stage.candidates) == (1.0, 10)
    assert layout.RANKER_FILE in manifest.files
    assert manifest.quality["ranker_int8_vs_pytorch_logit_correlation"] >= 0.95
    scorer = PairScorer(bundle_dir / layout.RANKER_FILE, bundle_dir / layout.TOKENIZER_FILE, 128)
    server = serve_bundle(bundle_dir)
    history = [pb.HistoryItem(item_id=i) for i in SPACE_FAN]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert (info.ranking_stage_candidates, info.ranking_stage_weight) == (10, 1.0)
        assert not info.ranking_stage_default
        first = stub.Recommend(pb.RecommendRequest(history=history, k=10), timeout=30).items
        staged = stub.Recommend(pb.RecommendRequest(history=history, k=4, ranking_stage=True), timeout=30).items
    user = render_user(UserText([data.items[data.item_ids.index(i)] for i in SPACE_FAN]),
                       manifest.max_history_items)
    logits = scorer.logits(user, [render_item(data.items[data.item_ids.index(i.item_id)]) for i in first])
    expected = sorted(((item.score + float(logit), item.item_id) for item, logit in zip(first, logits)),
                      key=lambda pair: -pair[0])[:4]
    assert [item.item_id for item in staged] == [item_id for _, item_id in expected]
    np.testing.assert_allclose([item.score for item in staged], [score for score, _ in expected], rtol=1e-5)
    assert [item.rank for item in staged] == [1, 2, 3, 4]


def test_asking_for_a_ranking_stage_the_model_lacks_is_refused(trained_bundle, serve_bundle):
    server = serve_bundle(trained_bundle)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).ranking_stage_candidates == 0
        with pytest.raises(grpc.RpcError) as error:
            stub.Recommend(pb.RecommendRequest(history=[pb.HistoryItem(item_id="m4")], k=5, ranking_stage=True),
                           timeout=30)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has no ranking stage" in error.value.details()
        unasked = stub.Recommend(pb.RecommendRequest(history=[pb.HistoryItem(item_id="m4")], k=5,
                                                     ranking_stage=False), timeout=30)
        assert len(unasked.items) == 5
