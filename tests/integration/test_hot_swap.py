"""Hot model swaps through the real server: LoadModel, bundle_root polling, rejected bundles, the catalogue carried
over (re-encoded by the new model, durably), sessions across a swap, and no failed request under load."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from llmrec import manifest as mf
from llmrec.clients.cli import app as cli
from llmrec.clients.status_details import details_of
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from llmrec.server.errors import REASON_BUNDLE_REJECTED
from llmrec.server.metrics import REGISTRY
from llmrec.server.settings import ServerSettings
from bench.hot_swap import variant_bundle
from conftest import BackgroundServer, settings_for
from rpc_helpers import call_error

GRAVITY = pb.CatalogueItem(item_id="new-gravity", attributes={"studio": "Warner Bros."},
                           text=pb.ItemText(title="Gravity (2013)", categories=["Sci-Fi"],
                                            description="Two astronauts stranded in orbit."))
CHANGED_M14 = pb.CatalogueItem(item_id="m14", text=pb.ItemText(title="Airplane! (1980, remastered)",
                                                                categories=["Comedy"]))
QUERY = pb.RecommendRequest(history=[pb.HistoryItem(item_id="m1"), pb.HistoryItem(item_id="m2")], k=5)
BATCH = pb.RecommendBatchRequest(requests=[QUERY, pb.RecommendRequest(history=[pb.HistoryItem(item_id="m3")], k=3)])


def swaps(outcome: str) -> float:
    return REGISTRY.get_sample_value("llmrec_model_swaps_total", {"outcome": outcome}) or 0.0


def timed_swaps() -> float:
    return REGISTRY.get_sample_value("llmrec_model_swap_seconds_count") or 0.0


def other_model(tiny_bundle: Path, root: Path, name: str) -> Path:
    """The tiny bundle under another version whose CPU model is its FP32 one: a different model (its vectors
    differ from INT8's), so re-encoded rows can be told from carried ones."""
    return variant_bundle(tiny_bundle, root, name, {mf.MODEL_INT8_FILE: tiny_bundle / mf.MODEL_FP32_FILE})


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    root = tmp_path / "bundles"
    root.mkdir()
    return root


def test_load_model_swaps_the_model_and_carries_the_catalogue_over(tiny_bundle, bundles, tmp_path):
    old = variant_bundle(tiny_bundle, bundles, "a-old")
    new = other_model(tiny_bundle, bundles, "b-new")
    state = tmp_path / "state"
    ok_before, timed_before = swaps("ok"), timed_swaps()
    server = BackgroundServer(settings_for(old, state_dir=state)).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            stub.UpsertItems(pb.UpsertItemsRequest(items=[GRAVITY, CHANGED_M14]), timeout=10)
            stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["m15"]), timeout=10)
            old_row = np.array(stub.GetItem(pb.GetItemRequest(item_id="new-gravity", include_vector=True),
                                            timeout=10).vector.values)
            assert stub.Recommend(QUERY, timeout=10).model_version == "a-old"
            assert stub.RecommendBatch(BATCH, timeout=10).model_version == "a-old"
            events: list = [pb.SessionRequest(event_id="1", config=pb.SessionConfig(
                k=3, history=[pb.HistoryItem(item_id="m1"), pb.HistoryItem(item_id="m2")]))]
            feed = threading.Semaphore(0)

            def session_requests():
                for event in events:
                    yield event
                    feed.acquire()

            session = stub.Session(session_requests(), timeout=60)
            first = next(session)
            assert first.model_version == "a-old" and first.status.code == 0
            rejected = first.items[0].item_id
            events.append(pb.SessionRequest(event_id="1b", rejection=rejected))
            feed.release()
            assert rejected not in [item.item_id for item in next(session).items]

            response = stub.LoadModel(pb.LoadModelRequest(bundle_path=str(new)), timeout=120)

            assert response.swapped and (response.model_version, response.previous_model_version) == ("b-new", "a-old")
            assert response.carried_changes == 3 and response.swap_seconds > 0
            assert response.index_version.startswith("b-new:")
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert info.model_version == "b-new" and info.index_version == response.index_version
            assert info.last_load.ok and info.last_load.trigger == "rpc" and info.last_load.bundle_path == str(new)
            assert swaps("ok") == ok_before + 1 and timed_swaps() == timed_before + 1
            # The upserted item is there, text and attributes kept, its row encoded by the new model.
            got = stub.GetItem(pb.GetItemRequest(item_id="new-gravity", include_vector=True), timeout=10)
            assert got.upserted and got.item.text == GRAVITY.text and dict(got.item.attributes) == {"studio": "Warner Bros."}
            row = np.array(got.vector.values)
            by_new_model = np.array(stub.Embed(pb.EmbedRequest(items=[GRAVITY.text]), timeout=10).items[0].values)
            np.testing.assert_allclose(row[:-1], by_new_model, atol=1e-6)
            assert not np.allclose(row, old_row, atol=1e-4)  # not the old model's vector copied over
            assert stub.GetItem(pb.GetItemRequest(item_id="m14"), timeout=10).item.text.title == CHANGED_M14.text.title
            assert call_error(stub.GetItem, pb.GetItemRequest(item_id="m15")).code() == grpc.StatusCode.NOT_FOUND
            assert stub.Recommend(QUERY, timeout=10).model_version == "b-new"
            batch = stub.RecommendBatch(BATCH, timeout=10)
            assert batch.model_version == "b-new" and [r.status.code for r in batch.results] == [0, 0]
            # The live session goes on, on the new model, with its history and its rejected item.
            events.append(pb.SessionRequest(event_id="2", interaction=pb.HistoryItem(item_id="new-gravity")))
            feed.release()
            second = next(session)
            assert second.status.code == 0 and second.model_version == "b-new" and second.history_length == 3
            assert second.session_id == first.session_id and len(second.items) == 3
            assert rejected not in [item.item_id for item in second.items]
            feed.release()  # half-close
            assert list(session) == []
            # The version already served: nothing to do.
            again = stub.LoadModel(pb.LoadModelRequest(bundle_path=str(new)), timeout=60)
            assert not again.swapped and again.model_version == "b-new" and again.carried_changes == 0
    finally:
        server.close()
    # Durable: a restart on the new bundle replays what the swap carried over.
    restarted = BackgroundServer(settings_for(new, state_dir=state)).start()
    try:
        with grpc.insecure_channel(restarted.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            got = stub.GetItem(pb.GetItemRequest(item_id="new-gravity", include_vector=True), timeout=10)
            np.testing.assert_allclose(np.array(got.vector.values), row, atol=1e-7)
            assert call_error(stub.GetItem, pb.GetItemRequest(item_id="m15")).code() == grpc.StatusCode.NOT_FOUND
    finally:
        restarted.close()


def test_a_rejected_bundle_leaves_the_old_model_serving(tiny_bundle, bundles, tmp_path):
    old = variant_bundle(tiny_bundle, bundles, "a-old")
    bad_hash = variant_bundle(tiny_bundle, bundles, "b-bad-hash")
    items = bad_hash / mf.ITEMS_FILE
    items.unlink()
    items.write_bytes((tiny_bundle / mf.ITEMS_FILE).read_bytes() + b"\n")
    bad_manifest = variant_bundle(tiny_bundle, bundles, "b-bad-manifest")
    manifest = bad_manifest / mf.MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace('"item_count": 42', '"item_count": 41'))  # digest now stale
    wrong_dimension = variant_bundle(tiny_bundle, bundles, "b-dimension", dimension=256, index_dimension=257)
    cases = {
        bad_hash: f"{mf.ITEMS_FILE} does not match its sha256",
        bad_manifest: f"{mf.MANIFEST_FILE} does not match {mf.MANIFEST_DIGEST_FILE}",
        wrong_dimension: "encoder outputs 384 dims, manifest says 256",
        bundles / "missing": f"{mf.MANIFEST_FILE} is missing",
        bundles / ("x" * 300): "File name too long",  # an OSError, not a bug: still a rejection
    }
    failed_before = swaps("failed")
    server = BackgroundServer(settings_for(old, state_dir=tmp_path / "state")).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            for path, why in cases.items():
                error = call_error(stub.LoadModel, pb.LoadModelRequest(bundle_path=str(path)))
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, path
                assert why in error.details() and "model a-old is still being served" in error.details()
                details = details_of(error)
                assert details.reason == REASON_BUNDLE_REJECTED
                assert details.metadata["bundle_path"] == str(path) and details.metadata["stage"] == "verify"
                info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
                assert info.model_version == "a-old"
                assert not info.last_load.ok and why in info.last_load.error and info.last_load.bundle_path == str(path)
                assert stub.Recommend(QUERY, timeout=10).model_version == "a-old"
            assert swaps("failed") == failed_before + len(cases)
            empty = call_error(stub.LoadModel, pb.LoadModelRequest())  # --bundle: no bundle_root to look in
            assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and "bundle_root" in empty.details()

            # Two loads at once: one swaps, the other is told another load is running.
            good = variant_bundle(tiny_bundle, bundles, "c-good")
            calls = [stub.LoadModel.future(pb.LoadModelRequest(bundle_path=str(good)), timeout=120) for _ in range(2)]
            outcomes = sorted(call.code().name for call in calls)
            assert outcomes == ["ABORTED", "OK"]
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_version == "c-good"

            # The command line: a rejected bundle is a permanent failure (exit 3), the served one a no-op.
            rejected = CliRunner().invoke(cli, ["load-model", str(bad_hash), "--target", server.target])
            assert rejected.exit_code == 3 and "FAILED_PRECONDITION" in rejected.stderr
            same = CliRunner().invoke(cli, ["load-model", str(good), "--target", server.target])
            assert same.exit_code == 0 and "already serving c-good" in same.stdout
    finally:
        server.close()


def test_bundle_root_polling_swaps_to_a_newer_bundle_and_skips_a_bad_one(tiny_bundle, bundles, tmp_path):
    variant_bundle(tiny_bundle, bundles, "a-old")
    settings = ServerSettings(bundle_root=bundles, host="127.0.0.1", port=0, prefer_gpu=False,
                              state_dir=tmp_path / "state", bundle_poll_seconds=0.05)
    server = BackgroundServer(settings).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            stub.UpsertItems(pb.UpsertItemsRequest(items=[GRAVITY]), timeout=10)
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_version == "a-old"

            variant_bundle(tiny_bundle, bundles, "b-broken", dimension=256, index_dimension=257)
            info = wait_for(stub, lambda info: info.last_load.bundle_path.endswith("b-broken"))
            assert not info.last_load.ok and info.last_load.trigger == "poll" and "256" in info.last_load.error
            assert info.model_version == "a-old" and stub.Recommend(QUERY, timeout=10).model_version == "a-old"

            other_model(tiny_bundle, bundles, "c-good")
            info = wait_for(stub, lambda info: info.model_version == "c-good")
            assert info.last_load.ok and info.last_load.trigger == "poll"
            assert stub.GetItem(pb.GetItemRequest(item_id="new-gravity"), timeout=10).upserted
            assert stub.Recommend(QUERY, timeout=10).model_version == "c-good"
    finally:
        server.close()


def wait_for(stub, condition, timeout_s: float = 120.0) -> pb.GetModelInfoResponse:
    """GetModelInfo until `condition` holds (polling runs every 0.05 s; the timeout only bounds a broken run)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        if condition(info):
            return info
        assert time.monotonic() < deadline, f"not reached: {info}"
        time.sleep(0.05)


def test_no_request_fails_and_no_write_is_lost_across_a_swap_under_load(tiny_bundle, bundles, tmp_path):
    old = variant_bundle(tiny_bundle, bundles, "a-old")
    new = other_model(tiny_bundle, bundles, "b-new")
    readers, before, after = 4, 3, 5  # calls per reader before the swap starts and after it is done
    server = BackgroundServer(settings_for(old, state_dir=tmp_path / "state")).start()
    calls: list[list[tuple[float, str]]] = [[] for _ in range(readers)]  # (started, model_version or error code)
    acknowledged: list[str] = []
    stop = threading.Event()

    def read(index: int) -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    if index == 0:  # a batch: leased like Recommend, every entry answered by the model it names
                        batch = stub.RecommendBatch(BATCH, timeout=60)
                        codes = {result.status.code for result in batch.results}
                        calls[index].append((started, batch.model_version if codes == {0} else f"entries {codes}"))
                    else:
                        calls[index].append((started, stub.Recommend(QUERY, timeout=60).model_version))
                except grpc.RpcError as error:
                    calls[index].append((started, error.code().name))

    def write() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            number = 0
            while not stop.is_set():
                item = pb.CatalogueItem(item_id=f"load-{number}", text=pb.ItemText(title=f"Load test item {number}"))
                stub.UpsertItems(pb.UpsertItemsRequest(items=[item]), timeout=60)  # an error fails the test
                acknowledged.append(item.item_id)
                number += 1

    def each_reader_has(count: int, since: float = 0.0) -> None:
        while any(sum(started >= since for started, _ in made) < count for made in calls):
            time.sleep(0.01)

    try:
        with grpc.insecure_channel(server.target) as channel, ThreadPoolExecutor(readers + 1) as pool:
            stub = pb_grpc.RecommenderStub(channel)
            running = [pool.submit(read, i) for i in range(readers)] + [pool.submit(write)]
            each_reader_has(before)
            response = stub.LoadModel(pb.LoadModelRequest(bundle_path=str(new)), timeout=120)
            swapped = time.monotonic()
            each_reader_has(after, since=swapped)
            stop.set()
            for future in running:
                future.result()
            answers = [answer for made in calls for _, answer in made]
            failed = [answer for answer in answers if answer not in ("a-old", "b-new")]
            print(f"\n{len(answers)} Recommend and RecommendBatch calls across a swap of {response.swap_seconds:.2f} s: "
                  f"{len(failed)} failed; {len(acknowledged)} upserts acknowledged")
            assert response.swapped and failed == []
            assert {"a-old", "b-new"} <= set(answers)
            assert all(answer == "b-new" for made in calls for started, answer in made if started >= swapped)
            # Every acknowledged upsert is in the new catalogue, encoded by the new model.
            assert acknowledged and set(acknowledged) <= all_item_ids(stub)
            last = stub.GetItem(pb.GetItemRequest(item_id=acknowledged[-1], include_vector=True), timeout=10)
            text_vector = stub.Embed(pb.EmbedRequest(items=[last.item.text]), timeout=10).items[0].values
            np.testing.assert_allclose(np.array(last.vector.values)[:-1], np.array(text_vector), atol=1e-6)
    finally:
        stop.set()
        server.close()


def all_item_ids(stub) -> set[str]:
    ids, token = set(), ""
    while True:
        page = stub.ListItems(pb.ListItemsRequest(page_size=1000, page_token=token), timeout=10)
        ids |= {item.item_id for item in page.items}
        if not (token := page.next_page_token):
            return ids


def test_variant_bundles_are_real_bundles(tiny_bundle, bundles):
    # What the tests above rely on: variant_bundle's output passes the manifest's own checks.
    made = other_model(tiny_bundle, bundles, "x-variant")
    manifest = mf.read_manifest(made, verify_hashes=True)
    assert manifest.bundle_version == "x-variant"
    assert json.loads((made / mf.MANIFEST_FILE).read_text())["files"][mf.MODEL_INT8_FILE] == \
        mf.sha256_file(tiny_bundle / mf.MODEL_FP32_FILE)
