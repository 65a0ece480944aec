"""Cold items, measured end to end (`make eval-cold`): hold a seeded share of the items out of training entirely,
upsert them into a running server through gRPC, rank every test user over the whole catalogue, and report
cold-target and warm-target quality side by side for every row, in one run.

Rows: the served system (cold-start map on, llmrec.cold_start; new items borrow their nearest trained items'
co-occurrence, llmrec.cooccurrence.Borrowers; every new item's score raised by the new-item boost,
llmrec.scoring), the same bundle served without the boost, with the map alone, and with no mechanism (new items
get the text vector and the median trained bias, no co-occurrence score and no boost), the served system with a
share of each list reserved for new items (RecommendRequest.new_item_share), the zero-shot encoder, SASRec and
popularity. The borrowing scale and then the boost are chosen on validation users. SASRec and popularity
have no parameter for a held-out item, so they rank every one below every item they know. Histories are
excluded from every row's list (MovieLens users never rate a film twice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import torch
import typer
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from experiments.baselines.sasrec import SASRecConfig, _left_pad, train_sasrec
from llmrec.export.bundle import build_bundle, with_cooccurrence
from llmrec.item_record import read_items
from llmrec.manifest import ITEMS_FILE
from llmrec.template import render_item
from llmrec.training.calibration import cooccurrence_before
from llmrec.training.checkpoint import checkpoint_dir
from llmrec.training.config import TrainConfig
from llmrec.training.data import Example, Interactions, item_popularity, load_interactions, split_examples
from llmrec.training.evaluation import ranking_metrics, target_ranks
from llmrec.training.model import TextRecommender, pretrained_encoder_path
from llmrec.training.progress import phase
from llmrec.training.sequence_model import SequenceModelConfig
from llmrec.training.train import encode_texts, train, user_vectors
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger("llmrec.cold_items")

KS = (10, 50)
SERVED = "llmrec (served)"
BORROWING_CHOICES = (0.0, 1.0, 2.0, 4.0)  # --new-item-cooccurrence values tried on validation
BOOST_CHOICES = (0.0, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.2, 0.3, 0.5, 1.0)  # --new-item-boost values tried
WARM_COST_BOUND = 0.01  # the boost may cost warm-target NDCG@10 at most this much, relative (the bound)
WITHOUT_EITHER = "llmrec, no cold-start mechanism (served)"
WITHOUT_BOOST = "llmrec, no new-item boost (served)"
REPORTED = ("recall@10", "ndcg@10", "recall@50")


def hold_out(data: Interactions, share: float, seed: int) -> tuple[Interactions, np.ndarray]:
    """(training data without the held-out items, mask of held-out items over the full catalogue).

    Held-out items are dropped from every sequence before train_sequences() cuts the last two events, so a
    training sequence only ever loses items: no valid or test target leaks in.
    """
    cold = np.zeros(data.num_items, dtype=bool)
    cold[np.random.default_rng(seed).choice(data.num_items, int(share * data.num_items), replace=False)] = True
    warm_numbers = np.flatnonzero(~cold)
    renumber = {int(old): new for new, old in enumerate(warm_numbers)}
    sequences, timestamps = [], []
    for user, sequence in enumerate(data.sequences):
        keep = [p for p, item in enumerate(sequence) if not cold[item]]
        sequences.append([renumber[sequence[p]] for p in keep])
        if data.timestamps:
            timestamps.append([data.timestamps[user][p] for p in keep])
    warm = Interactions(
        f"{data.name}-warm",
        [data.item_ids[i] for i in warm_numbers],
        [data.items[i] for i in warm_numbers],
        data.user_ids,
        sequences,
        timestamps,
    )
    return warm, cold


@dataclasses.dataclass
class Ranked:
    """One row's result over the test users: each target's 0-based rank (k or more: not in the list) and each
    user's top 10 (full-catalogue item numbers). ranks_at_10: the ranks in lists of 10, where they differ from
    the top 10 of the longer list (a share reserved for new items is a share of each list's own k)."""

    ranks: np.ndarray
    top10: np.ndarray
    ranks_at_10: np.ndarray | None = None


# --- the served rows: a real server, the held-out items upserted through gRPC --------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_serving(channel: grpc.Channel, timeout_s: float = 300) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not reach SERVING")


@contextlib.contextmanager
def served(bundle: Path, data: Interactions, cold: np.ndarray, flags: Sequence[str] = ()
           ) -> Iterator[tuple[pb_grpc.RecommenderStub, float]]:
    """A server of the bundle (its own process and state directory, these server flags) with the held-out items
    upserted through UpsertItems: yields the stub and the seconds the upserts took per item (acknowledged =
    recommendable)."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as state_dir:
        command = [sys.executable, "-m", "llmrec.server", "--bundle", str(bundle), "--port", str(port),
                   "--state-dir", state_dir, "--log-level", "warning", "--no-metrics",
                   "--encoder-path", "always", *flags]  # the encoder's path, as this experiment measures it
        server = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                _wait_serving(channel)
                stub = pb_grpc.RecommenderStub(channel)
                held_out = np.flatnonzero(cold)
                started = time.monotonic()
                for start in range(0, len(held_out), 100):
                    stub.UpsertItems(pb.UpsertItemsRequest(items=[
                        pb.CatalogueItem(item_id=data.item_ids[i], text=pb.ItemText(
                            title=data.items[i].title, categories=data.items[i].categories,
                            brand=data.items[i].brand, description=data.items[i].description))
                        for i in held_out[start : start + 100]
                    ]), timeout=600)
                yield stub, (time.monotonic() - started) / max(len(held_out), 1)
        finally:
            server.terminate()
            server.wait(timeout=60)


def recommend_request(data: Interactions, example: Example, use_context: bool, k: int,
                      new_item_share: float | None = None) -> pb.RecommendRequest:
    """The request for one example: its catalogued history (the last 500), its time when the model reads it."""
    sequence = data.sequences[example.user]
    history = [pb.HistoryItem(item_id=data.item_ids[i]) for i in sequence[: example.target_position][-500:]]
    context = pb.Context()
    timestamp = data.timestamp(example.user, example.target_position) if use_context else None
    if timestamp is not None:
        context.timestamp.CopyFrom(Timestamp(seconds=int(timestamp)))
    request = pb.RecommendRequest(history=history, context=context, k=k, exclude_history=True)
    if new_item_share is not None:
        request.new_item_share = new_item_share
    return request


def served_ranks(stub: pb_grpc.RecommenderStub, data: Interactions, test: Sequence[Example], use_context: bool,
                 k: int, new_item_share: float | None = None) -> Ranked:
    """Each test user's target rank in the served top k (k when it is not there) and their served top 10. With a
    new_item_share, a second request for k = 10 gives the top 10 and the ranks @10: the share is of each list."""
    number = {item_id: n for n, item_id in enumerate(data.item_ids)}
    lengths = (k, 10) if new_item_share is not None else (k,)
    ranks = {length: np.full(len(test), length, dtype=np.int64) for length in lengths}
    top10 = np.full((len(test), 10), -1, dtype=np.int64)
    for row, example in enumerate(test):
        target = data.sequences[example.user][example.target_position]
        for length in lengths:
            request = recommend_request(data, example, use_context, length, new_item_share)
            ranked = [number[item.item_id] for item in stub.Recommend(request, timeout=60).items]
            if target in ranked:
                ranks[length][row] = ranked.index(target)
            top10[row, : min(10, len(ranked))] = ranked[:10]  # the last request's: k = 10 when there are two
    return Ranked(ranks[k], top10, ranks.get(10) if len(lengths) > 1 else None)


def validation_bundle(out: Path, warm: Interactions, bundle: Path) -> Path:
    """The served bundle as it would have been built before the validation targets: its co-occurrence table counts
    only the training part of each sequence (cooccurrence_before(warm, "valid"), what calibration scores
    validation users with). The served bundle's table also counts the validation events, each validation
    target's own among them, which would inflate warm validation targets and bias the choice against borrowing.
    Every other file is the served bundle's (with_cooccurrence: a copy, no re-export)."""
    row_of = {item_id: row for row, (item_id, _) in enumerate(read_items(bundle / ITEMS_FILE))}
    table = cooccurrence_before(warm, "valid").renumber(np.array([row_of[i] for i in warm.item_ids]), len(row_of))
    shutil.rmtree(out / "valid-bundles", ignore_errors=True)
    return with_cooccurrence(bundle, table, out / "valid-bundles")


def choose_borrowing(bundle: Path, data: Interactions, cold: np.ndarray, valid: Sequence[Example], use_context: bool,
                     k: int, choices: Sequence[float]) -> dict:
    """The server's --new-item-cooccurrence with the best NDCG@10 over all validation users (cold and warm
    targets alike: what borrowing gives cold targets is weighed against what it costs warm ones); ties go to the
    smaller value. The test split is not looked at."""
    ndcg = {}
    for choice in choices:
        with served(bundle, data, cold, ["--new-item-cooccurrence", str(choice)]) as (stub, _):
            ranks = served_ranks(stub, data, valid, use_context, k).ranks
        ndcg[choice] = round(float(ranking_metrics(ranks, (10,))["ndcg@10"]), 5)
        log.info("validation ndcg@10 with --new-item-cooccurrence %s: %.4f", choice, ndcg[choice])
    return {"chosen": max(choices, key=lambda c: (ndcg[c], -c)), "validation_ndcg@10": ndcg}


def boosted_ranks(lists: Sequence[tuple[list[tuple[int, float]], list[tuple[int, float]]]], cold: np.ndarray,
                  targets_of: np.ndarray, boost: float, length: int = 10) -> np.ndarray:
    """Each target's 0-based rank (`length` when not there) in the top `length` that a server with this
    --new-item-boost would return, from the lists served without it: per user (the top k of every item, the top k
    of the new items alone), as (item, score) best first. Exact while the top `length` trained items are in the
    first list: raising the new items' scores keeps each group's own order."""
    ranks = np.full(len(lists), length, dtype=np.int64)
    for row, (everything, new_only) in enumerate(lists):
        scored = {item: score for item, score in everything if not cold[item]}
        scored.update({item: score + boost for item, score in new_only})
        best = sorted(scored, key=lambda item: -scored[item])[:length]
        if targets_of[row] in best:
            ranks[row] = best.index(targets_of[row])
    return ranks


def choose_boost(bundle: Path, data: Interactions, cold: np.ndarray, valid: Sequence[Example], use_context: bool,
                 k: int, flags: Sequence[str], choices: Sequence[float]) -> dict:
    """The server's --new-item-boost with the best NDCG@10 over all validation users among those that cost
    warm-target NDCG@10 at most WARM_COST_BOUND (relative, against no boost); ties go to the smaller value. One
    served pass (the server with `flags`) gives each user's top k and top k new items (new_item_share 1);
    boosted_ranks merges them for every value. The test split is not looked at."""
    number = {item_id: n for n, item_id in enumerate(data.item_ids)}
    lists = []
    with served(bundle, data, cold, flags) as (stub, _):
        for example in valid:
            lists.append(tuple(
                [(number[item.item_id], item.score)
                 for item in stub.Recommend(recommend_request(data, example, use_context, k, share), timeout=60).items]
                for share in (None, 1.0)))
    targets_of = np.array([data.sequences[e.user][e.target_position] for e in valid])
    is_cold = cold[targets_of]
    table = {}
    for choice in sorted({0.0, *choices}):  # no boost: the warm cost's reference
        ranks = boosted_ranks(lists, cold, targets_of, choice)
        table[choice] = {"ndcg@10": round(float(ranking_metrics(ranks, (10,))["ndcg@10"]), 5),
                         "cold recall@10": round(float(ranking_metrics(ranks[is_cold], (10,))["recall@10"]), 5),
                         "warm recall@10": round(float(ranking_metrics(ranks[~is_cold], (10,))["recall@10"]), 5),
                         "warm ndcg@10": round(float(ranking_metrics(ranks[~is_cold], (10,))["ndcg@10"]), 5)}
        log.info("validation with --new-item-boost %s: %s", choice, table[choice])
    floor = (1 - WARM_COST_BOUND) * table[0.0]["warm ndcg@10"]
    allowed = [c for c in table if table[c]["warm ndcg@10"] >= floor]
    return {"chosen": max(allowed, key=lambda c: (table[c]["ndcg@10"], -c)), "validation": table,
            "cold_users": int(is_cold.sum()), "warm_users": int((~is_cold).sum())}


# --- the offline rows: scores over the whole catalogue ----------------------------------------------------


def dense_ranked(scores_of, data: Interactions, test: Sequence[Example], batch: int = 256) -> Ranked:
    """Ranks and top 10 from (examples -> (n, num_items) scores), history items excluded."""
    ranks, top10 = [], []
    for start in range(0, len(test), batch):
        chunk = list(test[start : start + batch])
        scores = np.array(scores_of(chunk), dtype=np.float64)
        for row, example in enumerate(chunk):
            scores[row, data.sequences[example.user][: example.target_position]] = -np.inf
        targets = np.array([data.sequences[e.user][e.target_position] for e in chunk])
        ranks.append(target_ranks(scores, targets))
        top10.append(np.argsort(-scores, axis=1, kind="stable")[:, :10])
    return Ranked(np.concatenate(ranks), np.concatenate(top10))


def zero_shot_scores(data: Interactions, test: Sequence[Example], config: TrainConfig):
    """The packaged all-MiniLM-L6-v2 untrained: cosine of user text and item text, every item alike."""
    model = TextRecommender(pretrained_encoder_path(), data.num_items).eval()
    items = encode_texts(model, [render_item(i) for i in data.items], config.max_item_tokens,
                         "zero-shot catalogue").numpy()
    users = user_vectors(model, data, list(test), config, desc="zero-shot users")
    position = {example: row for row, example in enumerate(test)}
    return lambda chunk: users[[position[e] for e in chunk]] @ items.T


def known_items_scores(data: Interactions, cold: np.ndarray, warm_scores):
    """Scores over the full catalogue from a model of the warm items only: held-out items get -inf (below
    every known item). warm_scores: (warm-numbered histories) -> (n, warm items) scores."""
    warm_of = np.full(data.num_items, -1, dtype=np.int64)
    warm_of[~cold] = np.arange(int((~cold).sum()))

    def score(chunk: Sequence[Example]) -> np.ndarray:
        histories = [[int(warm_of[i]) for i in data.sequences[e.user][: e.target_position] if not cold[i]]
                     for e in chunk]
        out = np.full((len(chunk), data.num_items), -np.inf)
        out[:, ~cold] = warm_scores(histories)
        return out

    return score


def sasrec_warm_scores(warm: Interactions, config: SASRecConfig = SASRecConfig()):
    model, summary = train_sasrec(warm, config)
    log.info("SASRec on the warm items: %s", summary)

    @torch.no_grad()
    def score(histories: list[list[int]]) -> np.ndarray:
        return model(_left_pad(histories, config.max_length))[:, -1].numpy()

    return score, summary


# --- the report ----------------------------------------------------------------------------------------------


def row_metrics(ranked: Ranked, is_cold_target: np.ndarray, cold: np.ndarray) -> dict:
    listed = ranked.top10[ranked.top10 >= 0]
    at_10 = ranked.ranks if ranked.ranks_at_10 is None else ranked.ranks_at_10

    def metrics(users: np.ndarray) -> dict:
        return {**{m: v for m, v in ranking_metrics(at_10[users], (10,)).items() if m in REPORTED},
                "recall@50": ranking_metrics(ranked.ranks[users], (50,))["recall@50"]}

    return {"cold": metrics(is_cold_target), "warm": metrics(~is_cold_target),
            "cold_share@10": float(cold[listed].mean()) if len(listed) else 0.0}


def markdown(result: dict) -> str:
    lines = [
        f"# Cold items: {result['dataset']}",
        "",
        f"{result['held_out_items']} of {result['items']} items ({result['held_out_share']:.0%}, seed "
        f"{result['seed']}) held out of training and upserted through UpsertItems into a running server; "
        f"{result['test_users']} test users ranked over the whole catalogue, history excluded: "
        f"{result['cold_targets']} with a held-out (cold) target, {result['warm_targets']} with a warm one. "
        f"Text model: {result['train']['steps']} steps. Borrowed co-occurrence (--new-item-cooccurrence) "
        f"{result['new_item_cooccurrence']['chosen']}, chosen on validation NDCG@10 "
        f"{result['new_item_cooccurrence']['validation_ndcg@10']}.",
        "",
        "| row | cold R@10 | cold N@10 | cold R@50 | warm R@10 | warm N@10 | warm R@50 | cold share of top 10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        cells = [row["cold"][m] for m in REPORTED] + [row["warm"][m] for m in REPORTED] + [row["cold_share@10"]]
        lines.append(f"| {name} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    lines += ["", "Targets:", ""] + [f"* {line}" for line in result["targets"]]
    lines += boost_section(result["new_item_boost"])
    lines += ["", f"Upsert, acknowledged (= recommendable), seconds per item: {result['upsert_seconds_per_item']}",
              f"Cold-start map: {result['cold_start_map']}", ""]
    return "\n".join(lines)


def boost_section(boost: dict) -> list[str]:
    """The boost's choice on validation, as the trade-off it is: cold recall bought with warm NDCG."""
    table = {float(c): row for c, row in boost["validation"].items()}
    base = table[0.0]
    lines = ["", f"New-item boost (--new-item-boost) {boost['chosen']}: the best validation NDCG@10 of all users "
             f"among the values costing warm N@10 at most {WARM_COST_BOUND:.0%} ({boost['cold_users']} cold and "
             f"{boost['warm_users']} warm validation targets; served lists merged, experiments.cold_items."
             "boosted_ranks):", "",
             "| boost | N@10 (all) | cold R@10 | warm R@10 | cold / warm R@10 | warm N@10 vs no boost |",
             "|---|---|---|---|---|---|"]
    for choice, row in sorted(table.items()):
        ratio = row["cold recall@10"] / max(row["warm recall@10"], 1e-12)
        cost = row["warm ndcg@10"] / max(base["warm ndcg@10"], 1e-12) - 1
        lines.append(f"| {choice} | {row['ndcg@10']:.4f} | {row['cold recall@10']:.4f} | "
                     f"{row['warm recall@10']:.4f} | {ratio:.2f} | {cost:+.1%} |")
    return lines + [""]


def targets(rows: dict) -> list[str]:
    """The issue's targets for each served row: cold R@10 >= 0.5 x warm R@10 of the same row, and warm N@10 at
    most 1% below the same bundle served with no cold-start mechanism (no map, no borrowing, no reserved share)."""
    without = rows[WITHOUT_EITHER]
    lines = []
    for name, row in rows.items():
        if not name.startswith("llmrec"):
            continue
        ratio = row["cold"]["recall@10"] / max(row["warm"]["recall@10"], 1e-12)
        cost = row["warm"]["ndcg@10"] / max(without["warm"]["ndcg@10"], 1e-12) - 1
        lines.append(f"{name}: cold R@10 / warm R@10 = {ratio:.2f} (target >= 0.5: "
                     f"{'met' if ratio >= 0.5 else 'not met'}); warm N@10 {cost:+.1%} relative to the same bundle "
                     f"with no cold-start mechanism (target >= -1%: {'met' if cost >= -0.01 else 'not met'})")
    return lines


def measure(data_path: Path, out: Path, share: float, config: TrainConfig, sequence_config: SequenceModelConfig,
            new_item_shares: Sequence[float] = (0.1, 0.2), k: int = 50, reuse: bool = False,
            sasrec_config: SASRecConfig = SASRecConfig(),
            borrowing_choices: Sequence[float] = BORROWING_CHOICES, boost_choices: Sequence[float] = BOOST_CHOICES,
            max_users: int | None = None) -> dict:
    data = load_interactions(data_path)
    warm, cold = hold_out(data, share, config.seed)
    bundles = sorted((out / "bundles").glob("*/manifest.json")) if reuse else []
    if bundles:  # the text model, its adjustments and the bundle of an earlier run of the same hold-out
        run = json.loads((out / "run" / "metrics.json").read_text())
        bundle = bundles[-1].parent
        log.info("reusing %s and the run in %s", bundle, out / "run")
    else:
        run = train(warm, config, out / "run", sequence_config=sequence_config, model_free_baselines=False)
        with phase("export the bundle", log):
            bundle = build_bundle(checkpoint_dir(out / "run"), list(zip(warm.item_ids, warm.items)), out / "bundles",
                                  max_user_tokens=config.max_user_tokens, max_item_tokens=config.max_item_tokens,
                                  max_history_items=config.max_history_items)
    valid = split_examples(data, "valid")[:max_users]
    with phase("choose new_item_cooccurrence on validation users", log):
        valid_bundle = validation_bundle(out, warm, bundle)
        borrowing = choose_borrowing(valid_bundle, data, cold, valid, config.use_context, k, borrowing_choices)
    borrow = ["--new-item-cooccurrence", str(borrowing["chosen"])]
    with phase("choose new_item_boost on validation users", log):
        boost = choose_boost(valid_bundle, data, cold, valid, config.use_context, k, borrow, boost_choices)
    test = split_examples(data, "test")[:max_users]
    targets_of = np.array([data.sequences[e.user][e.target_position] for e in test])
    is_cold_target = cold[targets_of]
    ranked: dict[str, Ranked] = {}
    upsert_seconds = {}
    with phase("served rows", log):
        with served(bundle, data, cold, [*borrow, "--new-item-boost", str(boost["chosen"])]) as (stub, seconds):
            upsert_seconds["map and borrowing"] = round(seconds, 4)
            ranked[SERVED] = served_ranks(stub, data, test, config.use_context, k)
            for new_share in new_item_shares:
                ranked[f"llmrec, new_item_share {new_share} (served)"] = served_ranks(
                    stub, data, test, config.use_context, k, new_share)
        with served(bundle, data, cold, borrow) as (stub, _):
            ranked[WITHOUT_BOOST] = served_ranks(stub, data, test, config.use_context, k)
        with served(bundle, data, cold, ["--new-item-cooccurrence", "0"]) as (stub, seconds):
            upsert_seconds["map only"] = round(seconds, 4)
            ranked["llmrec, cold-start map, no borrowed co-occurrence (served)"] = served_ranks(
                stub, data, test, config.use_context, k)
        with served(bundle, data, cold, ["--no-cold-start-map", "--new-item-cooccurrence", "0"]) as (stub, seconds):
            upsert_seconds["neither"] = round(seconds, 4)
            ranked[WITHOUT_EITHER] = served_ranks(stub, data, test, config.use_context, k)
    with phase("zero-shot, SASRec and popularity", log):
        ranked["zero-shot all-MiniLM-L6-v2"] = dense_ranked(zero_shot_scores(data, test, config), data, test)
        sasrec, sasrec_summary = sasrec_warm_scores(warm, sasrec_config)
        ranked["SASRec (warm items only)"] = dense_ranked(known_items_scores(data, cold, sasrec), data, test)
        popularity = item_popularity(warm)
        ranked["popularity (warm items only)"] = dense_ranked(
            known_items_scores(data, cold, lambda histories: np.tile(popularity, (len(histories), 1))), data, test)
    rows = {name: row_metrics(r, is_cold_target, cold) for name, r in ranked.items()}
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    result = {
        "dataset": data.name,
        "items": data.num_items,
        "held_out_share": share,
        "seed": config.seed,
        "held_out_items": int(cold.sum()),
        "test_users": len(test),
        "cold_targets": int(is_cold_target.sum()),
        "warm_targets": int((~is_cold_target).sum()),
        "rows": rows,
        "targets": targets(rows),
        "upsert_seconds_per_item": upsert_seconds,
        "cold_start_map": metrics.get("cold_start"),
        "sasrec": sasrec_summary,
        "train": {"steps": run["steps"], "train_seconds": run["train_seconds"], "adjustments": run["adjustments"]},
        "reused_run": bool(bundles),
        "new_item_cooccurrence": borrowing,
        "new_item_boost": boost,
        "bundle": str(bundle),
        "config": dataclasses.asdict(config),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cold_items.json").write_text(json.dumps(result, indent=2))
    (out / "cold_items.md").write_text(markdown(result))
    return result


def main(
    data: Path = typer.Option(Path("data/ml-100k"), help="data set directory"),
    out: Path = typer.Option(Path("reports/cold-items/ml-100k"),
                             help="where the run, bundle, cold_items.json and cold_items.md go"),
    share: float = typer.Option(0.2, help="share of the catalogue held out of training and of the bundle"),
    seed: int = typer.Option(TrainConfig.seed, help="seeds the held-out items and the training"),
    max_steps: int = typer.Option(TrainConfig.max_steps),
    sequence_minutes: float = typer.Option(SequenceModelConfig.time_budget_minutes,
                                           help="stop the sequence model when spent"),
    sasrec_epochs: int = typer.Option(SASRecConfig.max_epochs, help="SASRec's bound on epochs (it stops early "
                                                                   "when validation stops improving)"),
    max_users: int = typer.Option(0, help="rank only the first N validation and test users (0: all)"),
    reuse: bool = typer.Option(False, help="serve the bundle an earlier run of the same hold-out left in OUT "
                                           "instead of training again (the served rows change with the server)"),
) -> None:
    logging.basicConfig(level=logging.INFO)
    result = measure(data, out, share, TrainConfig(max_steps=max_steps, seed=seed, calibration_users=max_users,
                                                   eval_users=max_users),
                     SequenceModelConfig(time_budget_minutes=sequence_minutes), reuse=reuse,
                     sasrec_config=SASRecConfig(max_epochs=sasrec_epochs), max_users=max_users or None)
    typer.echo(markdown(result))


if __name__ == "__main__":
    typer.run(main)
