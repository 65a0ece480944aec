"""A new bundle rolled out across replicas that share one PostgreSQL catalogue (`python -m llmrec.server`
processes, a real PostgreSQL from the pgserver wheel): the catalogue changes move to the new version once, in the
database (server.store.postgres.Migration), the old version turns read-only, replicas swap one at a time.

* LoadModel replica by replica: what the old version held is on the new one, re-encoded; a write to a replica
  still on the old version is refused (UNAVAILABLE with RetryInfo), never acknowledged and lost; writes made on the
  new version survive a late replica's swap (not deleted, not overwritten); a replica started on a newer bundle
  takes the fleet's changes over before it serves.
* bundle_root polling: a bundle published once is swapped in by every replica, one at a time, while writes go
  through every replica; every acknowledged write is on every replica afterwards (measured: acknowledged, lost,
  refused, time until the fleet serves the new version; rollout.json).

Sizes are counts: LLMREC_SCALE_WRITES changes before the publish and after it (default 20; make scale-test: 300).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmrec import manifest as mf
from llmrec.clients.client import RecommenderClient, RecommenderError

from bench.hot_swap import variant_bundle
from bench.postgres_server import Postgres, PostgresUnavailable, SequenceOnly
from fault_helpers import CALL_TIMEOUT_S, ServerProcess, report_dir, size, write_report

WRITES = size("LLMREC_SCALE_WRITES", 20)
CONVERGE_TIMEOUT_S = 300  # bounds for a hang, never performance assertions
SUPERSEDED = "MODEL_VERSION_SUPERSEDED"
RESULTS: dict = {"writes_before_and_after": WRITES}


class RootReplica(ServerProcess):
    """A replica serving the newest bundle under a root and polling it (--bundle-root), as a Deployment would."""

    @property
    def command(self) -> list[str]:
        command = super().command
        command[command.index("--bundle")] = "--bundle-root"
        return command


class Fleet:
    """Replicas on one database; every acknowledged change is remembered to check every replica against."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            self.postgres = Postgres(directory / "pg")
        except PostgresUnavailable as error:
            pytest.skip(f"no PostgreSQL to test the shared catalogue against: {error}")
        self.dsn_file = directory / "dsn"
        self.dsn_file.write_text(self.postgres.dsn + "\n")
        self.replicas: list[ServerProcess] = []
        self.clients: list[RecommenderClient] = []
        self.present: dict[str, str] = {}  # acknowledged upserts not deleted since: id -> title
        self.deleted: set[str] = set()
        self.refused: Counter = Counter()  # retryable refusals, by reason

    def start(self, bundle: Path, *extra: str, count: int = 1,
              kind: type[ServerProcess] = ServerProcess) -> list[RecommenderClient]:
        """`count` more replicas, started together; their clients once every one is SERVING."""
        started = [kind(bundle, self.directory / f"replica-{len(self.replicas) + n}.log", None, "--catalogue-store",
                        "postgres", "--postgres-dsn-file", str(self.dsn_file), *extra) for n in range(count)]
        for replica in started:
            replica.start()
        for replica in started:
            replica.wait_serving()
        self.replicas += started
        clients = [RecommenderClient(replica.target, timeout_s=CALL_TIMEOUT_S) for replica in started]
        self.clients += clients
        return clients

    def upsert(self, client: RecommenderClient, item_id: str, title: str) -> None:
        client.upsert_items([{"id": item_id, "title": title, "categories": ["Drama"]}])
        self.present[item_id] = title
        self.deleted.discard(item_id)

    def delete(self, client: RecommenderClient, item_id: str) -> None:
        client.delete_items([item_id], allow_missing=True)
        self.present.pop(item_id, None)
        self.deleted.add(item_id)

    def until_acknowledged(self, rng: random.Random, change) -> None:
        """change(client) through random replicas until one acknowledges it; retryable refusals are counted."""
        for _ in range(2000):
            try:
                change(rng.choice(self.clients))
                return
            except RecommenderError as error:
                if not error.retryable:
                    raise
                self.refused[error.reason or error.code.name] += 1
                time.sleep(error.retry_after_s or 0.05)
        raise AssertionError("a change was not acknowledged by any replica after 2000 tries")

    def random_change(self, rng: random.Random, prefix: str, number: int) -> None:
        if self.present and rng.random() < 0.2:
            item_id = rng.choice(sorted(self.present))
            self.until_acknowledged(rng, lambda client: self.delete(client, item_id))
        else:
            self.until_acknowledged(rng, lambda client: self.upsert(client, f"{prefix}-{number}", f"Film {number}"))

    def lost(self) -> int:
        """Acknowledged changes missing (or deleted items back) on some replica, once all are at one revision."""
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while len({client.model_info().index_version for client in self.clients}) != 1:
            assert time.monotonic() < deadline, [client.model_info().index_version for client in self.clients]
            time.sleep(0.05)
        missing = 0
        for client in self.clients:
            listed = {item.item_id: item.title for item in client.iter_items()}
            wrong = {item_id: (title, listed.get(item_id)) for item_id, title in self.present.items()
                     if listed.get(item_id) != title}
            back = self.deleted & listed.keys()
            if wrong or back:
                print(f"{client.model_info().index_version}: wrong {wrong}, deleted but listed {sorted(back)}")
            missing += len(wrong) + len(back)
        return missing

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for replica in self.replicas:
            replica.stop()
        self.postgres.close()


@pytest.fixture
def fleet(tmp_path: Path):
    running = Fleet(tmp_path)
    yield running
    running.close()


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory):
    yield
    write_report(report_dir(tmp_path_factory.mktemp("reports")), "rollout.json", RESULTS)


def other_model(tiny_bundle: Path, root: Path, name: str) -> Path:
    """The tiny bundle under another version with another model (its FP32 one as the CPU model): re-encoded rows
    differ from the old version's."""
    return variant_bundle(tiny_bundle, root, name, {mf.MODEL_INT8_FILE: tiny_bundle / mf.MODEL_FP32_FILE})


def refusal(call) -> RecommenderError:
    with pytest.raises(RecommenderError) as raised:
        call()
    return raised.value


def test_replica_by_replica_no_write_is_lost_and_a_late_swap_keeps_the_new_versions_writes(tiny_bundle, fleet,
                                                                                          tmp_path):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    old = variant_bundle(tiny_bundle, bundles, "a-old")
    new = other_model(tiny_bundle, bundles, "b-new")
    first, late = fleet.start(old, count=2)
    fleet.upsert(first, "kept", "Written before the rollout")
    fleet.upsert(late, "rewritten", "Old version's text")
    fleet.upsert(late, "deleted-later", "Deleted on the new version")
    fleet.delete(late, "m15")  # a bundle item
    fleet.upsert(first, "gone", "Upserted then deleted")
    fleet.delete(first, "gone")

    swapped = first.load_model(str(new))
    assert swapped.swapped and swapped.model_version == "b-new" and swapped.carried_changes == 5  # 3 + 2 deletes
    kept = first.get_item("kept", include_vector=True)
    by_new_model = first.embed(items=[{"title": "Written before the rollout", "categories": ["Drama"]}]).items[0]
    np.testing.assert_allclose(np.array(kept.vector)[:-1], by_new_model, atol=1e-6)  # re-encoded, not copied

    # The late replica still serves the old version, now read-only: refused with RetryInfo, never acknowledged.
    error = refusal(lambda: late.upsert_items([{"id": "refused", "title": "Never acknowledged"}]))
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.retryable and error.reason == SUPERSEDED
    assert error.retry_after_s and error.retry_after_s > 0 and error.metadata["successor_model_version"] == "b-new"
    assert "read-only" in error.message and "retry" in error.message
    assert late.recommend(query="space adventure", k=3).model_version == "a-old"  # reads go on

    # Writes on the new version, then the late replica's swap: it must neither delete nor overwrite them.
    fleet.upsert(first, "native", "Written on the new version")
    fleet.upsert(first, "rewritten", "New version's text")
    fleet.delete(first, "deleted-later")
    late_swap = late.load_model(str(new))
    assert late_swap.swapped and late_swap.carried_changes == 0  # migrated once, by the first replica
    assert fleet.lost() == 0
    assert late.get_item("rewritten").title == "New version's text"
    assert refusal(lambda: late.get_item("refused")).code == grpc.StatusCode.NOT_FOUND

    # A replica started on a newer bundle (a Deployment's rolling update) takes the fleet's changes over first.
    (started,) = fleet.start(variant_bundle(tiny_bundle, bundles, "c-next"))
    assert started.model_info().model_version == "c-next"
    fleet.clients = [started]  # the b-new replicas are read-only now
    assert fleet.lost() == 0
    error = refusal(lambda: first.upsert_items([{"id": "refused-2", "title": "Never acknowledged"}]))
    assert error.reason == SUPERSEDED and error.metadata["successor_model_version"] == "c-next"
    fleet.upsert(started, "after", "Written on c-next")
    assert started.get_item("after").title == "Written on c-next"


@pytest.mark.timeout(1200)
def test_a_published_bundle_rolls_out_one_replica_at_a_time_under_writes(tiny_bundle, fleet, tmp_path, reports):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    variant_bundle(tiny_bundle, bundles, "a-old")
    fleet.start(bundles, "--bundle-poll-seconds", "0.2", count=3, kind=RootReplica)
    rng = random.Random(5)
    for number in range(WRITES):
        fleet.random_change(rng, "before", number)

    writes = Counter()
    done = threading.Event()

    def write() -> None:  # one change at a time through random replicas until the fleet serves b-new
        number = 0
        while not done.is_set():
            fleet.random_change(rng, "during", number)
            writes["acknowledged"] += 1
            number += 1

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    published = time.perf_counter()
    other_model(tiny_bundle, bundles, "b-new")
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    while any(client.model_info().model_version != "b-new" for client in fleet.clients):
        assert time.monotonic() < deadline and writer.is_alive(), "the fleet did not converge on b-new"
        time.sleep(0.05)
    converged_s = time.perf_counter() - published
    done.set()
    writer.join(CALL_TIMEOUT_S * 2)
    for number in range(WRITES):
        fleet.random_change(rng, "after", number)
    lost = fleet.lost()

    # One replica at a time: each swap (loading to SERVING) began after the previous one ended.
    spans = sorted(_swap_span(replica) for replica in fleet.replicas)
    carried = [_carried(replica) for replica in fleet.replicas]
    RESULTS["rollout"] = {
        "replicas": len(fleet.replicas), "acknowledged_during": writes["acknowledged"],
        "acknowledged_total": 2 * WRITES + writes["acknowledged"], "lost": lost,
        "refused_during": dict(fleet.refused), "fleet_on_new_version_s": round(converged_s, 2),
        "swap_s": [round(end - start, 2) for start, end in spans], "carried_by_replica": carried,
        "present": len(fleet.present), "deleted": len(fleet.deleted)}
    assert lost == 0
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), spans
    assert sorted(carried)[:-1] == [0, 0] and sorted(carried)[-1] > 0, carried  # migrated once


def _log(replica: ServerProcess) -> list[dict]:
    """The replica's JSON log lines of this run (the server logs JSON when its output is not a terminal)."""
    return [json.loads(line) for line in replica.run_log().splitlines() if line.startswith("{")]


def _swap_span(replica: ServerProcess) -> tuple[float, float]:
    """(loading began, swapped in) of the replica's hot swap, from its log's timestamps: both logged while the
    replica holds the rollout lock (its SERVING line comes after the release, so it may follow the next loading)."""
    times = {}
    for line in _log(replica):
        message = line["message"]
        if message.startswith("hot swap (poll): loading"):
            times["loading"] = dt.datetime.fromisoformat(line["time"]).timestamp()
        elif message.startswith("hot swap (poll): model") and "releasing the rollout lock" in message:
            times["swapped"] = dt.datetime.fromisoformat(line["time"]).timestamp()
    assert len(times) == 2, replica.run_log()[-3000:]
    return times["loading"], times["swapped"]


def _carried(replica: ServerProcess) -> int:
    """Catalogue changes this replica carried over in its swap (0: the version was migrated already)."""
    for line in _log(replica):
        found = re.match(r"hot swap \(poll\): SERVING .*\((\d+) catalogue changes carried over\)", line["message"])
        if found:
            return int(found[1])
    raise AssertionError(replica.run_log()[-3000:])


def test_a_migration_stopped_half_way_is_resumed_by_the_next_replica(fleet, tiny_bundle, monkeypatch):
    import asyncio

    from llmrec.server.domain import CatalogueItem
    from llmrec.server.state import Delete, Upsert
    from llmrec.server.store import VersionSuperseded
    from llmrec.server.store import postgres as shared
    from llmrec.template import ItemFields

    dimension = mf.read_manifest(tiny_bundle).index_dimension
    encoded: list[str] = []

    def opened(version: str) -> shared.PostgresStore:
        store = shared.PostgresStore(fleet.postgres.dsn, version, dimension)
        store.open(SequenceOnly())
        return store

    async def encode(items):  # what Recommender.item_rows returns: one index row per item
        encoded.extend(item.item_id for item in items)
        if fail_after is not None and len(encoded) > fail_after:
            raise RuntimeError("replica killed")
        return np.ones((len(items), dimension), np.float32)

    async def migrate(store: shared.PostgresStore) -> shared.Migration:
        async with store.migration(encode) as migration:
            await migration.finish()
        return migration

    def upsert(store: shared.PostgresStore, item_id: str) -> None:
        store.commit(Upsert([CatalogueItem(item_id, ItemFields(f"Film {item_id}"), (), upserted=True)],
                            np.ones((1, dimension), np.float32)))

    fail_after = None
    # Tables and a version made by a server from before migrations: the first newer server adds the columns, and
    # the version it finds counts as complete (it was served as it was).
    fleet.postgres.psql(f"{shared.SCHEMA}; INSERT INTO llmrec_catalogue_head VALUES ('s-source', {dimension}, 0)")
    source = opened("s-source")
    assert asyncio.run(migrate(source)).source is None  # complete already: nothing to take over
    for number in range(7):
        upsert(source, f"item-{number}")
    source.commit(Delete(["item-3"]))

    monkeypatch.setattr(shared, "MIGRATION_BATCH", 2)
    fail_after = 3  # killed in its second batch: the first one (2 items) is committed
    first = opened("t-target")
    with pytest.raises(RuntimeError, match="replica killed"):
        asyncio.run(migrate(first))
    first.close()
    head = fleet.postgres.psql("SELECT migrated_from, migrated_seq, migration_complete FROM llmrec_catalogue_head "
                               "WHERE bundle_version = 't-target'")
    assert re.search(r"s-source\s+\|\s+2\s+\|\s+f", head), head
    upsert(source, "item-late")  # the source still takes writes

    fail_after, encoded = None, []
    second = opened("t-target")
    migration = asyncio.run(migrate(second))
    assert migration.source == "s-source" and migration.complete
    # resumed after the first batch: neither of its items was encoded again
    assert sorted(encoded) == ["item-2", "item-4", "item-5", "item-6", "item-late"], encoded
    items = fleet.postgres.psql("SELECT item_id, item IS NULL FROM llmrec_catalogue_items WHERE bundle_version = "
                                "'t-target' ORDER BY item_id")
    assert re.findall(r"(item-\S+)\s+\|\s+(\w)", items) == [
        ("item-0", "f"), ("item-1", "f"), ("item-2", "f"), ("item-3", "t"), ("item-4", "f"), ("item-5", "f"),
        ("item-6", "f"), ("item-late", "f")]
    with pytest.raises(VersionSuperseded, match="migrated to version t-target"):
        upsert(source, "refused")
    upsert(second, "native")
    third = opened("t-target")  # a replica loading the version later: nothing left to do
    assert asyncio.run(migrate(third)).carried == 0
    for store in (source, second, third):
        store.close()
