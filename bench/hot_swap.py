"""Hot model swaps under load: requests failed across each swap, and how long a swap takes.

    python -m bench.hot_swap --bundle bundles/ml-100k/<version> --out reports/hot_swap

Starts `llmrec-server --bundle BUNDLE --state-dir <tmp>` as a subprocess, upserts `--upserts` items (catalogue
changes every swap must re-encode and carry over), then runs `--readers` client threads calling Recommend back to
back (random histories of catalogue ids; one channel each, like separate clients) and `--writers` threads
upserting one item per call, while the main thread swaps the model `--swaps` times with LoadModel, alternating
between BUNDLE and a copy of it under another bundle version (same files, so both directions cost the same: full
hash check, load, warm-up, re-encoding of every upserted item). Before each swap, and after the last, every reader
makes `--between` more calls: the run is bounded by counts, not by time.

Reported: per swap, the server's swap time (start of the load to swapped in, LoadModelResponse.swap_seconds),
the call's wall time, the changes carried over, and the requests that overlapped the swap (completed, failed,
slowest); over the run, requests failed by status code, latency percentiles inside and outside swaps, and
acknowledged catalogue writes missing afterwards (must be 0). Writes `hot_swap.json` and `hot_swap.md` to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from llmrec import manifest as mf
from llmrec.clients.client import RecommenderClient, RecommenderError
from llmrec.item_record import read_items

from bench.bench import machine, start_llmrec


def variant_bundle(source: Path, root: Path, name: str, replace: Mapping[str, Path] | None = None,
                   **manifest_changes) -> Path:
    """A copy of the bundle `source` as root/name without copying its files: every file a symlink to source's
    (those in `replace` to other files, their sha256 updated), bundle_version `name`, manifest_changes applied
    and the digest rewritten. Built beside root/name and renamed into place, as export does."""
    staging = root / f".{name}.staging"
    manifest = json.loads((source / mf.MANIFEST_FILE).read_text())
    for relative in manifest["files"]:
        link = staging / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        target = Path((replace or {}).get(relative, source / relative)).resolve()
        link.symlink_to(target)
        if relative in (replace or {}):
            manifest["files"][relative] = mf.sha256_file(target)
    manifest.update(bundle_version=name, **manifest_changes)
    (staging / mf.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    mf.write_manifest_digest(staging)
    final = root / name
    staging.rename(final)
    return final


@dataclasses.dataclass
class Call:
    started: float  # time.monotonic()
    ended: float
    code: str  # "OK" or the status code's name
    model_version: str = ""


class Load:
    """Reader and writer threads against one server until stop() is called."""

    def __init__(self, target: str, readers: int, writers: int, item_ids: list[str], history: int, seed: int) -> None:
        self.target = target
        self.item_ids = item_ids
        self.history = history
        self.calls: list[list[Call]] = [[] for _ in range(readers)]
        self.acknowledged: list[str] = []  # ids of upserts the server acknowledged
        self.write_failures: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, args=(i, seed + i), daemon=True) for i in range(readers)]
        self._threads += [threading.Thread(target=self._write, args=(i,), daemon=True) for i in range(writers)]
        for thread in self._threads:
            thread.start()

    def _read(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        with RecommenderClient(self.target, timeout_s=60) as client:
            while not self._stop.is_set():
                history = rng.sample(self.item_ids, self.history)
                started = time.monotonic()
                try:
                    result = client.recommend(history, k=10)
                    call = Call(started, time.monotonic(), "OK", result.model_version)
                except RecommenderError as error:
                    call = Call(started, time.monotonic(), error.code.name)
                self.calls[index].append(call)

    def _write(self, index: int) -> None:
        number = 0
        with RecommenderClient(self.target, timeout_s=60) as client:
            while not self._stop.is_set():
                item_id = f"bench-writer{index}-{number}"
                number += 1
                try:
                    client.upsert_items([{"id": item_id, "title": f"Benchmark item {number}",
                                          "categories": ["Benchmark"]}])
                    self.acknowledged.append(item_id)
                except RecommenderError as error:
                    self.write_failures[error.code.name] += 1

    def wait_for(self, calls_each: int) -> None:
        """Block until every reader has made `calls_each` more calls than now."""
        goals = [len(calls) + calls_each for calls in self.calls]
        while any(len(calls) < goal for calls, goal in zip(self.calls, goals)):
            time.sleep(0.01)

    def stop(self) -> list[Call]:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        return [call for calls in self.calls for call in calls]


def percentiles(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"count": 0}
    values = np.asarray(values_ms)
    return {"count": len(values_ms), "p50_ms": round(float(np.percentile(values, 50)), 2),
            "p99_ms": round(float(np.percentile(values, 99)), 2), "max_ms": round(float(values.max()), 2)}


def run(args: argparse.Namespace) -> dict:
    bundle = Path(args.bundle).resolve()
    catalogue = read_items(bundle / mf.ITEMS_FILE)
    item_ids = [item_id for item_id, _ in catalogue]
    work = Path(tempfile.mkdtemp(prefix="llmrec-hot-swap-"))
    other = variant_bundle(bundle, work, f"{bundle.name}-swap")
    process = start_llmrec(bundle, work / "server.log", ["--state-dir", str(work / "state")])
    swaps: list[dict] = []
    try:
        with RecommenderClient(process.target, timeout_s=600) as client:
            rng = random.Random(args.seed)
            chosen = rng.sample(catalogue, min(args.upserts, len(catalogue)))
            for start in range(0, len(chosen), 100):  # changed copies of real items: realistic text lengths
                client.upsert_items([{"id": f"bench-upsert-{item_id}", "title": f"{fields.title} (director's cut)",
                                      "categories": list(fields.categories), "description": fields.description}
                                     for item_id, fields in chosen[start : start + 100]])
            memory_before = process.memory_mb()  # one model loaded, the upserts applied
            load = Load(process.target, args.readers, args.writers, item_ids, args.history, args.seed)
            try:
                for number in range(args.swaps):
                    load.wait_for(args.between)
                    target = other if number % 2 == 0 else bundle
                    started = time.monotonic()
                    response = client.load_model(str(target))
                    ended = time.monotonic()
                    swaps.append({"swap": number + 1, "from": response.previous_model_version,
                                  "to": response.model_version, "swapped": response.swapped,
                                  "swap_seconds": round(response.swap_seconds, 3),
                                  "call_seconds": round(ended - started, 3),
                                  "carried_changes": response.carried_changes,
                                  "window": (started, ended)})
                load.wait_for(args.between)
            finally:
                calls = load.stop()
            present = {item.item_id for item in client.iter_items()}
            final_version = client.model_info().model_version
            memory_after = process.memory_mb()
    finally:
        process.stop()
    log = (work / "server.log").read_text()
    shutil.rmtree(work, ignore_errors=True)

    windows = [swap.pop("window") for swap in swaps]
    for swap, (low, high) in zip(swaps, windows):
        during = [c for c in calls if c.started < high and c.ended > low]
        swap["requests_overlapping"] = len(during)
        swap["requests_failed"] = sum(c.code != "OK" for c in during)
        swap["slowest_overlapping_ms"] = round(max(((c.ended - c.started) * 1e3 for c in during), default=0.0), 1)
        swap["answered_by"] = dict(Counter(c.model_version for c in during if c.code == "OK"))
    inside, outside = [], []
    for call in calls:
        overlaps = any(call.started < high and call.ended > low for low, high in windows)
        (inside if overlaps else outside).append((call.ended - call.started) * 1e3)
    failures = Counter(c.code for c in calls if c.code != "OK")
    return {
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "requests": len(calls),
        "requests_failed": sum(failures.values()),
        "failures_by_code": dict(failures),
        "latency_outside_swaps": percentiles(outside),
        "latency_during_swaps": percentiles(inside),
        "writes_acknowledged": len(load.acknowledged),
        "writes_failed": dict(load.write_failures),
        "writes_lost": sum(item_id not in present for item_id in load.acknowledged),
        "final_model_version": final_version,
        "server_memory_mb": {"rss_before_swaps": memory_before["rss_mb"], "rss_after": memory_after["rss_mb"],
                             "peak_rss": memory_after["peak_rss_mb"]},
        "server_log_tracebacks": log.count("Traceback"),
        "swaps": swaps,
    }


def markdown(result: dict) -> str:
    settings = result["settings"]
    lines = [
        "# Hot model swaps under load",
        "",
        f"`python -m bench.hot_swap --bundle {settings['bundle']} --readers {settings['readers']} --writers "
        f"{settings['writers']} --swaps {settings['swaps']} --upserts {settings['upserts']} --between "
        f"{settings['between']}` on {result['machine']['cpu']} ({result['machine']['cores']} cores), client and "
        "server on the same cores.",
        "",
        "| swap | from -> to | swap time (s) | LoadModel call (s) | changes carried | requests during | failed | "
        "slowest during (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for swap in result["swaps"]:
        lines.append(f"| {swap['swap']} | {swap['from']} -> {swap['to']} | {swap['swap_seconds']:.2f} | "
                     f"{swap['call_seconds']:.2f} | {swap['carried_changes']} | {swap['requests_overlapping']} | "
                     f"{swap['requests_failed']} | {swap['slowest_overlapping_ms']:.0f} |")
    inside, outside = result["latency_during_swaps"], result["latency_outside_swaps"]
    lines += [
        "",
        f"Requests: {result['requests']}, failed: **{result['requests_failed']}** {result['failures_by_code'] or ''}; "
        f"catalogue writes acknowledged during the run: {result['writes_acknowledged']}, lost: "
        f"**{result['writes_lost']}**, failed: {result['writes_failed'] or 0}.",
        "",
        f"Server memory: RSS {result['server_memory_mb']['rss_before_swaps']} MB before the first swap, peak "
        f"{result['server_memory_mb']['peak_rss']} MB (two models are held while a swap runs and while the old "
        "one finishes its requests).",
        "",
        "| Recommend latency | requests | p50 (ms) | p99 (ms) | max (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, summary in (("outside swaps", outside), ("overlapping a swap", inside)):
        if summary["count"]:
            lines.append(f"| {name} | {summary['count']} | {summary['p50_ms']} | {summary['p99_ms']} | "
                         f"{summary['max_ms']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="a bundle directory (its copy under another version is "
                                                         "swapped in and out)")
    parser.add_argument("--readers", type=int, default=4, help="threads calling Recommend back to back")
    parser.add_argument("--writers", type=int, default=1, help="threads upserting one item per call")
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--upserts", type=int, default=200, help="items upserted before the first swap")
    parser.add_argument("--between", type=int, default=50, help="calls per reader before each swap and after")
    parser.add_argument("--history", type=int, default=5, help="catalogue ids per Recommend history")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("reports/hot_swap"))
    args = parser.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hot_swap.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "hot_swap.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["requests_failed"] == 0 and result["writes_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
