"""Chaos: kill -9 a real server during concurrent upserts and deletes, round after round on one state
directory, then damage its journal and snapshot on purpose.

Each round starts the server on the state the last round left, checks that every change acknowledged so far is
served (0 lost) and that nothing refused or never sent appears, then runs two upserters and a deleter at once and
kills the process with SIGKILL once a drawn number of changes has been acknowledged. Changes in flight at the kill
have no outcome yet: either result is accepted, and the next round's check pins down which one happened.

Damage cases (each on a copy of the final state): cut 40 bytes off the journal, garbage after it, a corrupt
middle record, a missing journal, a missing/corrupt/truncated snapshot. Start-up must recover everything
acknowledged or refuse with one clear line (exit 2), changing nothing on disk when it refuses.

Size: LLMREC_CHAOS_ROUNDS rounds (2 in `make test`, 10 in `make chaos`); report in chaos.json.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from llmrec.item_record import read_items
from llmrec.server.state import JOURNAL_FILE, SNAPSHOT_FILE, TORN_SUFFIX
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc

from fault_helpers import CALL_TIMEOUT_S, START_TIMEOUT_S, ServerProcess, report_dir, size, write_report

ROUNDS = size("LLMREC_CHAOS_ROUNDS", 2)
SNAPSHOT_EVERY = 7  # small: kills land before, during and after snapshots and journal replacements
TINY = read_items(Path(__file__).parents[1] / "fixtures" / "tiny" / "items.jsonl")
GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN}  # what a call in flight at the kill may end with: its outcome is unknown


class Model:
    """What the catalogue must hold: id -> title, None for absent; `uncertain` ids may be either way (a change in
    flight at a kill), with the title they would have if present."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.expected: dict[str, str | None] = {item_id: fields.title for item_id, fields in TINY}
        self.uncertain: dict[str, str | None] = {}
        self.acknowledged = 0

    def acked(self, item_id: str, title: str | None) -> None:
        with self.lock:
            self.expected[item_id] = title
            self.uncertain.pop(item_id, None)
            self.acknowledged += 1

    def in_flight(self, item_id: str, title: str | None) -> None:
        """A change that may or may not have happened: present with `title`, or as before."""
        with self.lock:
            before = self.expected.get(item_id)
            self.uncertain[item_id] = title if title is not None else before

    def check(self, live: dict[str, str]) -> list[str]:
        """Compare with the served catalogue; resolve the uncertain ids to what is served. Returns the problems."""
        problems = []
        for item_id, title in self.expected.items():
            served = live.get(item_id)
            if item_id in self.uncertain:
                possible = {title, self.uncertain[item_id], None}
                if served not in possible:
                    problems.append(f"{item_id}: served {served!r}, expected one of {possible}")
                self.expected[item_id] = served
            elif served != title:
                problems.append(f"{item_id}: served {served!r}, acknowledged {title!r}")
        for item_id in live.keys() - self.expected.keys():
            if item_id in self.uncertain and self.uncertain[item_id] == live[item_id]:
                self.expected[item_id] = live[item_id]
            else:
                problems.append(f"{item_id}: served but never acknowledged nor in flight")
        self.uncertain.clear()
        return problems


def served(server: ServerProcess) -> dict[str, str]:
    """The whole live catalogue, id -> title, through ListItems."""
    live: dict[str, str] = {}
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        token = ""
        while True:
            page = stub.ListItems(pb.ListItemsRequest(page_size=97, page_token=token), timeout=CALL_TIMEOUT_S)
            live.update({item.item_id: item.text.title for item in page.items})
            token = page.next_page_token
            if not token:
                return live


def writer(target: str, model: Model, stop: threading.Event, failures: list, work: Callable) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        while not stop.is_set():
            try:
                if not work(stub):
                    return
            except grpc.RpcError as error:
                if error.code() not in GONE:
                    failures.append(f"{error.code().name}: {error.details()}")
                return


def upserter(model: Model, prefix: str, rng: random.Random) -> Callable:
    counter = iter(range(10**9))

    def work(stub) -> bool:
        batch = [(f"{prefix}-{next(counter)}", rng.randint(0, 999)) for _ in range(rng.randint(1, 3))]
        items = [pb.CatalogueItem(item_id=item_id, text=pb.ItemText(title=f"{item_id} v{version}"),
                                  attributes={"v": str(version)}) for item_id, version in batch]
        for item_id, version in batch:
            model.in_flight(item_id, f"{item_id} v{version}")
        stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=CALL_TIMEOUT_S)
        for item_id, version in batch:
            model.acked(item_id, f"{item_id} v{version}")
        return True

    return work


def deleter(model: Model, prefix: str, rng: random.Random) -> Callable:
    """Deletes items that exist (bundle items and earlier rounds' upserts); upserts and deletes its own otherwise."""
    with model.lock:
        pool = [item_id for item_id, title in model.expected.items() if title is not None]
    rng.shuffle(pool)
    counter = iter(range(10**9))

    def work(stub) -> bool:
        if pool and rng.random() < 0.7:
            item_id = pool.pop()
            model.in_flight(item_id, None)
            stub.DeleteItems(pb.DeleteItemsRequest(item_ids=[item_id]), timeout=CALL_TIMEOUT_S)
            model.acked(item_id, None)
        else:
            item_id = f"{prefix}-{next(counter)}"
            model.in_flight(item_id, f"{item_id} once")
            stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogueItem(
                item_id=item_id, text=pb.ItemText(title=f"{item_id} once"))]), timeout=CALL_TIMEOUT_S)
            model.acked(item_id, f"{item_id} once")
            model.in_flight(item_id, None)
            stub.DeleteItems(pb.DeleteItemsRequest(item_ids=[item_id]), timeout=CALL_TIMEOUT_S)
            model.acked(item_id, None)
        return True

    return work


def state_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != "LOCK"}


@pytest.fixture(scope="module")
def chaos(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs the kill -9 rounds once; the tests below check and extend what they left."""
    work = tmp_path_factory.mktemp("chaos")
    state = work / "state"
    log = work / "server.log"
    model = Model()
    rounds: list[dict] = []
    for number in range(ROUNDS + 1):  # the last start only checks what the last kill left
        server = ServerProcess(tiny_bundle, log, state, "--snapshot-every", str(SNAPSHOT_EVERY)).start()
        try:
            server.wait_serving()
            problems = model.check(served(server))
            if number == ROUNDS:
                rounds.append({"round": "final check", "lost_or_wrong": len(problems), "problems": problems[:10]})
                break
            rng = random.Random(number)
            kill_after = model.acknowledged + rng.randint(12, 40)
            stop, failures = threading.Event(), []
            threads = [threading.Thread(target=writer, args=(server.target, model, stop, failures, work_fn))
                       for work_fn in (upserter(model, f"r{number}a", rng), upserter(model, f"r{number}b", rng),
                                       deleter(model, f"r{number}d", rng))]
            for thread in threads:
                thread.start()
            waited = 0
            while model.acknowledged < kill_after and all(t.is_alive() for t in threads):
                time.sleep(0.005)
                waited += 1
                assert waited < START_TIMEOUT_S * 200, "the writers stalled"
            server.kill9()  # mid-stream: every writer has a call in flight or about to be
            stop.set()
            for thread in threads:
                thread.join(timeout=CALL_TIMEOUT_S * 2)
            rounds.append({"round": number, "lost_or_wrong_at_start": len(problems), "problems": problems[:10],
                           "acknowledged_total": model.acknowledged, "in_flight_at_kill": len(model.uncertain),
                           "writer_failures": failures[:5]})
        finally:
            if server.alive():
                server.kill9()
    return {"work": work, "state": state, "model": model, "rounds": rounds, "bundle": tiny_bundle,
            "log": log, "tracebacks": log.read_text(errors="replace").count("Traceback"), "damage": {}}


@pytest.fixture(scope="module", autouse=True)
def chaos_report(chaos):
    yield
    lost = sum(r.get("lost_or_wrong_at_start", r.get("lost_or_wrong", 0)) for r in chaos["rounds"])
    write_report(report_dir(chaos["work"]), "chaos.json", {
        "rounds": ROUNDS, "acknowledged_changes": chaos["model"].acknowledged, "lost": lost,
        "snapshot_every": SNAPSHOT_EVERY, "per_round": chaos["rounds"], "damage_cases": chaos["damage"],
        "tracebacks_in_log": chaos["tracebacks"],
    })


@pytest.mark.timeout(600 + 180 * ROUNDS)  # the rounds run in the fixture, inside this test's time
def test_kill_9_during_concurrent_writes_loses_no_acknowledged_change(chaos):
    assert len(chaos["rounds"]) == ROUNDS + 1
    for summary in chaos["rounds"]:
        assert not summary.get("writer_failures"), summary
        assert not summary["problems"], summary
    assert chaos["model"].acknowledged >= 12 * ROUNDS
    assert chaos["tracebacks"] == 0


@pytest.fixture(scope="module")
def pending_state(chaos) -> Path:
    """The final state plus three acknowledged upserts left in the journal after its base record (the server is
    killed long before its next snapshot): what every damage case starts from, on its own copy."""
    copy = chaos["work"] / "pending"
    shutil.copytree(chaos["state"], copy)
    journal = copy / chaos["bundle"].name / JOURNAL_FILE
    server = ServerProcess(chaos["bundle"], chaos["work"] / "pending.log", copy, "--snapshot-every", "1000").start()
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            for n in range(3):
                item_id = f"pending-{n}"
                stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogueItem(
                    item_id=item_id, text=pb.ItemText(title=f"{item_id} title"))]), timeout=CALL_TIMEOUT_S)
                chaos["model"].acked(item_id, f"{item_id} title")
        assert not chaos["model"].check(served(server))
    finally:
        server.kill9()
    assert journal.read_bytes().count(b"\n") >= 4  # base, (older changes,) the three pending ones
    assert (journal.parent / SNAPSHOT_FILE).is_file()
    return copy


def damage_case(chaos, pending: Path, name: str, damage: Callable[[Path], None], expect: str):
    """Apply damage to a fresh copy of the pending state and start a server on it: it must recover everything
    acknowledged (expect "recover": returns what was not served, the files set aside and the log) or refuse with
    one clear line and change nothing on disk (expect "refuse")."""
    copy = chaos["work"] / f"damage-{len(chaos['damage'])}"
    shutil.copytree(pending, copy)
    directory = copy / chaos["bundle"].name
    damage(directory)
    before = state_files(directory)
    server = ServerProcess(chaos["bundle"], chaos["work"] / f"damage-{name}.log", copy)
    if expect == "refuse":
        code, output = server.run_to_exit()
        refusals = [line for line in output.splitlines() if line.startswith("llmrec-server: ")]
        chaos["damage"][name] = {"outcome": "refused", "exit_code": code, "message": refusals[-1:]}
        assert code == 2, output[-3000:]
        assert len(refusals) == 1 and "cannot use the state directory" in refusals[0], output[-3000:]
        assert "Traceback" not in output
        assert state_files(directory) == before, "a refused start changed the state directory"
        return
    server.start()
    try:
        server.wait_serving()
        live = served(server)
    finally:
        server.stop()
    expected = {i: t for i, t in chaos["model"].expected.items() if t is not None}
    missing = sorted(i for i, t in expected.items() if live.get(i) != t)
    set_aside = sorted(p.name for p in directory.glob(JOURNAL_FILE + TORN_SUFFIX + "*"))
    chaos["damage"][name] = {"outcome": "recovered", "acknowledged_not_served": missing, "set_aside": set_aside,
                             "warning": "ends in a torn record" in server.run_log()}
    return missing, set_aside, server.run_log()


def test_a_journal_cut_40_bytes_short_serves_the_rest_and_sets_the_tail_aside(chaos, pending_state):
    missing, set_aside, log = damage_case(
        chaos, pending_state, "journal cut 40 bytes",
        lambda d: (d / JOURNAL_FILE).write_bytes((d / JOURNAL_FILE).read_bytes()[:-40]), "recover")
    assert missing == ["pending-2"]  # the cut record's one change, and nothing else
    assert len(set_aside) == 1 and "ends in a torn record" in log and "may be lost" in log


def test_garbage_after_the_journal_loses_nothing(chaos, pending_state):
    missing, set_aside, _ = damage_case(
        chaos, pending_state, "journal garbage tail",
        lambda d: (d / JOURNAL_FILE).write_bytes((d / JOURNAL_FILE).read_bytes() + b"\x00" * 37), "recover")
    assert missing == [] and len(set_aside) == 1


def _flip_middle_record(directory: Path) -> None:
    path = directory / JOURNAL_FILE
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:-5] + bytes([lines[1][-5] ^ 0x01]) + lines[1][-4:]  # the first change, not the last
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(("name", "damage"), [
    ("journal middle record corrupt", _flip_middle_record),
    ("journal missing", lambda d: (d / JOURNAL_FILE).unlink()),
    ("snapshot missing", lambda d: (d / SNAPSHOT_FILE).unlink()),
    ("snapshot corrupt", lambda d: (d / SNAPSHOT_FILE).write_bytes(
        (d / SNAPSHOT_FILE).read_bytes().replace(b'"title":"', b'"title":"X', 1))),
    ("snapshot truncated", lambda d: (d / SNAPSHOT_FILE).write_bytes(
        (d / SNAPSHOT_FILE).read_bytes()[: (d / SNAPSHOT_FILE).stat().st_size // 2])),
])
def test_damage_that_could_lose_acknowledged_changes_refuses_to_start(chaos, pending_state, name, damage):
    damage_case(chaos, pending_state, name, damage, "refuse")
