"""Many replicas, one catalogue: three `python -m llmrec.server` processes share a real PostgreSQL database
(catalogue_store = postgres), reads go through one client balancing round-robin over them.

* writes through random replicas under read load become visible on every replica (convergence p50/p99 measured);
* kill -9 of a replica during writes, and a crash-restart of the database during writes, lose no acknowledged
  change, and every replica converges to the same revision;
* a fourth replica started later catches up from the database (snapshot + tail) and only then is SERVING.

Sizes are counts (`make test` runs them small, `make scale-test` at full size), written to scale_out.json:
    LLMREC_SCALE_WRITES    acknowledged changes per phase (default 20)
    LLMREC_SCALE_CATCHUP   changes the fourth replica catches up on (default 200; make scale-test: 100,000)
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmrec.clients.client import RecommenderClient, RecommenderError
from llmrec.manifest import read_manifest

from bench.postgres_server import Postgres, PostgresUnavailable, seed_items
from fault_helpers import CALL_TIMEOUT_S, START_TIMEOUT_S, ServerProcess, report_dir, size, write_report

WRITES = size("LLMREC_SCALE_WRITES", 20)
CATCHUP = size("LLMREC_SCALE_CATCHUP", 200)
REPLICAS = 3
CONVERGE_TIMEOUT_S = 120  # bounds for a hang, never performance assertions
CATCH_UP_TIMEOUT_S = max(START_TIMEOUT_S, 0.1 * CATCHUP)  # every replica adds each seeded item to its index
RESULTS: dict = {"writes_per_phase": WRITES, "catch_up_changes": CATCHUP}


class Cluster:
    def __init__(self, bundle: Path, directory: Path) -> None:
        self.bundle, self.directory = bundle, directory
        try:
            self.postgres = Postgres(directory / "pg")
        except PostgresUnavailable as error:
            pytest.skip(f"no PostgreSQL to test the shared catalogue against: {error}")
        self.dsn_file = directory / "dsn"  # as a Kubernetes Secret is mounted
        self.dsn_file.write_text(self.postgres.dsn + "\n")
        self.replicas = [self.replica(n) for n in range(REPLICAS)]
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            replica.wait_serving()
        self.clients = [RecommenderClient(r.target, timeout_s=CALL_TIMEOUT_S) for r in self.replicas]
        self.balanced = RecommenderClient("ipv4:" + ",".join(r.target for r in self.replicas), timeout_s=10,
                                          load_balancing="round_robin")
        self.present: set[str] = set()  # acknowledged upserts not deleted since
        self.deleted: set[str] = set()  # acknowledged deletes
        self.next_id = 0

    def replica(self, number: int) -> ServerProcess:
        return ServerProcess(self.bundle, self.directory / f"replica-{number}.log", None,
                             "--catalogue-store", "postgres", "--postgres-dsn-file", str(self.dsn_file))

    def change(self, rng: random.Random) -> None:
        """One acknowledged change through a random replica (another one after a retryable failure): an upsert,
        or every fifth a delete of an upserted item."""
        if self.present and rng.random() < 0.2:
            item_id = rng.choice(sorted(self.present))
            self.until_acknowledged(rng, lambda client: client.delete_items([item_id], allow_missing=True))
            self.present.discard(item_id)
            self.deleted.add(item_id)
        else:
            item_id = f"scale-{self.next_id}"
            self.next_id += 1
            item = {"id": item_id, "title": f"Replicated film {item_id}", "categories": ["Drama"]}
            self.until_acknowledged(rng, lambda client: client.upsert_items([item]))
            self.present.add(item_id)
            self.deleted.discard(item_id)

    def until_acknowledged(self, rng: random.Random, call) -> int:
        """Retry a retryable failure (a killed replica, a database restart) until acknowledged; the replica."""
        for _ in range(2000):
            number = rng.randrange(len(self.clients))
            try:
                call(self.clients[number])
                return number
            except RecommenderError as error:
                if not error.retryable:
                    raise
                time.sleep(0.05)
        raise AssertionError("a change was not acknowledged by any replica after 2000 tries")

    def revisions(self) -> list[str]:
        return [client.model_info().index_version for client in self.clients]

    def lost(self) -> int:
        """Acknowledged changes missing on some replica, once every replica reached the same revision."""
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while len(set(self.revisions())) != 1:
            assert time.monotonic() < deadline, f"replicas did not converge: {self.revisions()}"
            time.sleep(0.05)
        missing = 0
        for client in self.clients:
            listed = {item.item_id for item in client.iter_items()}
            missing += len(self.present - listed) + len(self.deleted & listed)
        return missing

    def close(self) -> None:
        for client in [*self.clients, self.balanced]:
            client.close()
        for replica in self.replicas:
            replica.stop()
        self.postgres.close()


class ReadLoad:
    """Recommend calls through the round-robin client on a thread, until stopped (at most 100,000)."""

    def __init__(self, client: RecommenderClient) -> None:
        self.client, self.codes = client, Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _ in range(100_000):
            if self._stop.is_set():
                return
            try:
                self.client.recommend(query="space adventure", k=5)
                self.codes["OK"] += 1
            except RecommenderError as error:
                self.codes[error.code.name] += 1
                time.sleep(0.01)

    def stop(self) -> Counter:
        self._stop.set()
        self._thread.join(CALL_TIMEOUT_S)
        return self.codes


@pytest.fixture(scope="module")
def cluster(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    running = Cluster(tiny_bundle, tmp_path_factory.mktemp("scale-out"))
    yield running
    running.close()
    write_report(report_dir(tmp_path_factory.mktemp("reports")), "scale_out.json", RESULTS)


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(values, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(values, 99)) * 1e3, 2),
            "max_ms": round(max(values) * 1e3, 2), "count": len(values)}


def test_a_write_through_one_replica_reaches_every_replica(cluster):
    rng = random.Random(1)
    reads = ReadLoad(cluster.balanced)
    per_replica, all_replicas = [], []
    try:
        _converge(cluster, rng, per_replica, all_replicas)
    finally:
        codes = reads.stop()
    RESULTS["convergence"] = {"each_other_replica": percentiles(per_replica),
                              "all_replicas": percentiles(all_replicas), "reads": dict(codes)}
    assert codes["OK"] > 0 and set(codes) == {"OK"}, codes  # every read succeeded while writes went on
    assert cluster.lost() == 0


def _converge(cluster: Cluster, rng: random.Random, per_replica: list[float], all_replicas: list[float]) -> None:
    """WRITES upserts through random replicas; the time from each acknowledgement until each other replica
    (per_replica) and every replica (all_replicas) shows the item."""
    for n in range(WRITES):
        item_id = f"converge-{n}"
        writer = cluster.until_acknowledged(
            rng, lambda client: client.upsert_items([{"id": item_id, "title": f"Converging film {n}"}]))
        acknowledged = time.perf_counter()
        cluster.present.add(item_id)
        pending = {number for number in range(REPLICAS) if number != writer}
        assert cluster.clients[writer].get_item(item_id).item_id == item_id  # read-your-write on the writer
        while pending:
            assert time.perf_counter() - acknowledged < CONVERGE_TIMEOUT_S, f"{item_id} never reached {pending}"
            for number in sorted(pending):
                try:
                    cluster.clients[number].get_item(item_id)
                except RecommenderError as error:
                    assert error.code == grpc.StatusCode.NOT_FOUND
                    continue
                per_replica.append(time.perf_counter() - acknowledged)
                pending.discard(number)
        all_replicas.append(time.perf_counter() - acknowledged)


def _writes_across(cluster: Cluster, fault, recover, seed: int, during_fault: bool) -> dict:
    """WRITES acknowledged changes under read load; fault() after a third of them, recover() after two thirds
    (the third in between is written during the fault when `during_fault`, else after recovering)."""
    rng = random.Random(seed)
    reads = ReadLoad(cluster.balanced)
    try:
        for n in range(WRITES):
            if n == WRITES // 3:
                fault()
                if not during_fault:
                    recover()
            if n == 2 * WRITES // 3 and during_fault:
                recover()
            cluster.change(rng)
    finally:
        codes = reads.stop()
    lost = cluster.lost()
    return {"acknowledged_present": len(cluster.present), "acknowledged_deleted": len(cluster.deleted),
            "lost": lost, "reads": dict(codes), "revision": cluster.revisions()[0]}


def test_kill_9_of_a_replica_during_writes_loses_nothing_and_it_converges(cluster):
    victim = cluster.replicas[1]

    def restart() -> None:
        victim.start()
        victim.wait_serving(START_TIMEOUT_S)
        # a new channel: the old one may still be backing off from the refused reconnections after the kill
        cluster.clients[1].close()
        cluster.clients[1] = RecommenderClient(victim.target, timeout_s=CALL_TIMEOUT_S)

    result = _writes_across(cluster, victim.kill9, restart, seed=2, during_fault=True)
    RESULTS["kill_9_replica"] = result
    assert result["lost"] == 0
    assert result["reads"].get("OK", 0) > 0


def test_a_database_crash_restart_during_writes_loses_nothing_and_every_replica_converges(cluster):
    outage: dict = {}

    def crash() -> None:
        cluster.postgres.stop(immediate=True)
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while any(replica.health() == "SERVING" for replica in cluster.replicas):  # each noticed it is cut off
            assert time.monotonic() < deadline, "a replica stayed SERVING without its database"
            time.sleep(0.05)
        outage["down"] = time.perf_counter()
        refused = []
        for client in cluster.clients:  # nothing can be acknowledged without the database
            with pytest.raises(RecommenderError) as error:
                client.upsert_items([{"id": "during-outage", "title": "Never acknowledged"}])
            refused.append(error.value.code.name)
        outage["writes_during_outage"] = refused
        assert set(refused) == {"UNAVAILABLE"}
        # a replica still answers reads itself, but the balanced client (client-side health checking) sends none
        assert cluster.clients[0].recommend(query="space adventure", k=5).items
        while True:
            try:
                cluster.balanced.recommend(query="space adventure", k=5)
            except RecommenderError as error:
                assert error.code == grpc.StatusCode.UNAVAILABLE
                break
            assert time.monotonic() < deadline, "the balanced client still sent calls to NOT_SERVING replicas"
            time.sleep(0.05)

    def restart() -> None:
        cluster.postgres.start()
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while any(replica.health() != "SERVING" for replica in cluster.replicas):
            assert time.monotonic() < deadline, "a replica did not catch up after the database came back"
            time.sleep(0.05)
        outage["serving_again_after_start_s"] = round(time.perf_counter() - outage.pop("down"), 2)

    result = _writes_across(cluster, crash, restart, seed=3, during_fault=False)
    RESULTS["database_restart"] = {**result, **outage}
    assert result["lost"] == 0


def test_a_database_holding_the_version_with_other_index_rows_is_refused(cluster, tiny_bundle):
    from llmrec.server.state import StateError
    from llmrec.server.store.postgres import PostgresStore

    manifest = read_manifest(tiny_bundle)
    store = PostgresStore(cluster.postgres.dsn, manifest.bundle_version, manifest.index_dimension + 1)
    with pytest.raises(StateError, match="two different bundles share one version name"):
        store.open(None)


@pytest.mark.timeout(600 + 0.3 * CATCHUP)  # seeding and every replica's index growth run inside this test
def test_a_replica_started_later_catches_up_before_it_serves(cluster, tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    cluster.present.update(seed_items(cluster.postgres.dsn, manifest, CATCHUP))
    late = cluster.replica(REPLICAS)
    spawned = time.perf_counter()
    late.start()
    late.wait_serving(CATCH_UP_TIMEOUT_S)
    serving_s = time.perf_counter() - spawned
    with RecommenderClient(late.target, timeout_s=CALL_TIMEOUT_S) as client:
        late_version = client.model_info().index_version
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while len(set(cluster.revisions())) != 1 or cluster.revisions()[0] != late_version:
            assert time.monotonic() < deadline, f"{late_version} vs {cluster.revisions()}"
            time.sleep(0.1)
        listed = {item.item_id for item in client.iter_items(page_size=1000)}
    late.stop()
    caught_up = re.search(r"caught up to change (\d+) \((\d+) operations\) in ([0-9.]+) s", late.run_log())
    assert caught_up is not None, late.run_log()[-2000:]
    RESULTS["late_replica"] = {
        "changes_seeded": CATCHUP, "store_revision": int(caught_up.group(1)),
        "catch_up_s": float(caught_up.group(3)), "spawn_to_serving_s": round(serving_s, 2),
        "items": len(listed)}
    # SERVING came only after the whole catalogue was applied: its first answer already had the last revision
    assert late_version == cluster.revisions()[0]
    assert cluster.present <= listed and not cluster.deleted & listed

