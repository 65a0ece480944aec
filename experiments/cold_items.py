"""Cold items, measured end to end: hold a share of items out of training and out of the bundle, upsert them
into a running server through gRPC, and rank test targets that are cold (`make eval-cold`).

The ID baseline (SASRec) and popularity have no parameters for a held-out item, so they cannot rank one
above any item they know; the text model places it from its text alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import typer
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmrec.export.bundle import build_bundle
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from llmrec.training.checkpoint import checkpoint_dir
from llmrec.training.config import TrainConfig
from llmrec.training.data import Interactions, load_interactions, split_examples
from llmrec.training.evaluation import ranking_metrics
from llmrec.training.train import train

log = logging.getLogger("llmrec.cold_items")


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(bundle: Path, state_dir: Path, port: int) -> subprocess.Popen:
    # the encoder's path for every request, as this experiment measured before the fast path existed
    command = [sys.executable, "-m", "llmrec.server", "--bundle", str(bundle), "--port", str(port), "--state-dir", str(state_dir),
               "--no-metrics", "--encoder-path", "always"]
    return subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)


def _wait_serving(channel: grpc.Channel, timeout_s: float = 120) -> None:
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


def measure(data_path: Path, out: Path, share: float, config: TrainConfig, k: int = 50) -> dict:
    data = load_interactions(data_path)
    warm, cold = hold_out(data, share, config.seed)
    run = train(warm, config, out / "run")
    validation = []  # random catalogue histories are enough for the export quality gate here
    bundle = build_bundle(checkpoint_dir(out / "run"), list(zip(warm.item_ids, warm.items)), out / "bundles",
                          max_user_tokens=config.max_user_tokens, max_item_tokens=config.max_item_tokens,
                          max_history_items=config.max_history_items, validation_users=validation)
    test = split_examples(data, "test")
    targets = np.array([data.sequences[e.user][e.target_position] for e in test])
    port = _free_port()
    with tempfile.TemporaryDirectory() as state_dir:
        server = _serve(bundle, Path(state_dir), port)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                _wait_serving(channel)
                stub = pb_grpc.RecommenderStub(channel)
                held_out = np.flatnonzero(cold)
                for start in range(0, len(held_out), 100):
                    stub.UpsertItems(pb.UpsertItemsRequest(items=[
                        pb.CatalogueItem(item_id=data.item_ids[i], text=pb.ItemText(
                            title=data.items[i].title, categories=data.items[i].categories,
                            brand=data.items[i].brand, description=data.items[i].description))
                        for i in held_out[start : start + 100]
                    ]), timeout=60)
                ranks = np.array([_served_rank(stub, data, e, config.use_context, k) for e in test])
        finally:
            server.terminate()
            server.wait(timeout=30)
    is_cold = cold[targets]
    result = {
        "dataset": data.name,
        "held_out_share": share,
        "held_out_items": int(cold.sum()),
        "cold_targets": int(is_cold.sum()),
        "warm_targets": int((~is_cold).sum()),
        "llmrec_served_cold": ranking_metrics(ranks[is_cold], (10, 50)),
        "llmrec_served_warm": ranking_metrics(ranks[~is_cold], (10, 50)),
        # Neither has a parameter for a held-out item: it scores below every known item, rank >= known items.
        "id_baseline_cold": ranking_metrics(np.full(int(is_cold.sum()), int((~cold).sum())), (10, 50)),
        "popularity_cold": ranking_metrics(np.full(int(is_cold.sum()), int((~cold).sum())), (10, 50)),
        "train_seconds": run["train_seconds"],
        "config": dataclasses.asdict(config),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cold_items.json").write_text(json.dumps(result, indent=2))
    return result


def _served_rank(stub, data: Interactions, example, use_context: bool, k: int) -> int:
    """0-based rank of the target in the served top k; k when it is not there."""
    history = [pb.HistoryItem(item_id=data.item_ids[i]) for i in data.sequences[example.user][: example.target_position]]
    context = pb.Context()
    timestamp = data.timestamp(example.user, example.target_position) if use_context else None
    if timestamp is not None:
        context.timestamp.CopyFrom(Timestamp(seconds=int(timestamp)))
    response = stub.Recommend(pb.RecommendRequest(history=history[-500:], context=context, k=k), timeout=30)
    target = data.item_ids[data.sequences[example.user][example.target_position]]
    ranked = [item.item_id for item in response.items]
    return ranked.index(target) if target in ranked else k


def main(
    data: Path = typer.Option(Path("data/ml-100k"), help="data set directory"),
    out: Path = typer.Option(Path("reports/cold-items"), help="where the run, bundle and cold_items.json go"),
    share: float = typer.Option(0.1, help="share of the catalogue held out of training and of the bundle"),
    max_steps: int = typer.Option(TrainConfig.max_steps),
) -> None:
    logging.basicConfig(level=logging.WARNING)
    result = measure(data, out, share, TrainConfig(max_steps=max_steps))
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    typer.run(main)
