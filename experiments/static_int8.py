"""Static (calibrated) INT8 against the bundle's dynamic INT8 and FP32 encoders on CPU (issue 37): may the CPU server
batch texts of different requests with a static model?

    nice -n 10 python -m experiments.static_int8 --bundle bundles/ml-100k/<version> --data data/ml-100k \
        --out reports/static-int8

1. Quantizes the bundle's FP32 encoder with onnxruntime's quantize_static, twice: static_int8 quantizes the same
   MatMuls as the bundle's dynamic model (export/onnx.py: all 48, per-channel INT8 weights, UINT8 activations);
   static_int8_ffn_fp32 leaves the 6 FFN down-projections in FP32 (down_projections). QDQ format, MatMul inputs
   only (a quantized output too adds a rounding per MatMul: user cosine to FP32 0.972 instead of 0.995), activation
   ranges (MinMax) calibrated once on rendered user and item texts, one text per run as the server runs them,
   drawn apart from the evaluated users and items. (The histogram calibrators, Percentile and Entropy, fail on
   runs of different widths in onnxruntime 1.31: they stack the tensors of all runs.)
2. Batch independence: every evaluated text encoded alone (its own padded width) and inside batches of 8/16/32
   random other texts, users and items mixed (padded to the widest): the largest absolute difference per model.
3. Quality against FP32: cosine of user and item vectors; top-10 agreement of the exact inner-product search over
   the bundle's served item rows (llmrec.scoring.query_rows @ items/vectors.npy) for the users, and over rows of
   the model's own item vectors (how text-only items upserted on a CPU server would rank).
4. Throughput on pre-tokenised user texts (the heavy case, ~128 tokens): per-request runs (batch 1) and batches of
   8/16/32 per model, 1 and 2 intra-op threads, and two callers on one-thread sessions (the server's concurrent
   lanes); configurations interleaved round by round so machine noise hits them alike. texts/s is the median
   over rounds; run latency p50/p99 over all runs.

Writes <out>/report.json, report.md and the static models (model_<name>.onnx). --data takes the users from a
data set (bench.loadgen.build_workload: 20 history items at a random point of a real sequence, its timestamp as
context); without it, users are random 20-item histories of the catalogue.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import typer
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from llmrec import manifest as mf
from llmrec.item_record import read_items
from llmrec.onnx_encoder import OnnxEncoder
from llmrec.scoring import item_rows, query_rows
from llmrec.template import ItemFields, RequestContext, UserText, render_item, render_user

BATCHES = (8, 16, 32)
THREADS = (1, 2)
TOP_K = 10
HISTORY_ITEMS = 20
# static model -> whether it keeps the FFN down-projections in FP32
STATIC_MODELS = {"static_int8": False, "static_int8_ffn_fp32": True}


class CalibrationTexts(CalibrationDataReader):
    """quantize_static's calibration feeds: one text per run at its own padded width, as the CPU server runs texts.

    groups: (texts, max_tokens) pairs, e.g. user texts at the bundle's max_user_tokens and items at max_item_tokens.
    """

    def __init__(self, encoder: OnnxEncoder, groups: Sequence[tuple[Sequence[str], int]]) -> None:
        self._feeds = (encoder.feed(*encoder.tokenize([text], max_tokens))
                       for texts, max_tokens in groups for text in texts)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def down_projections(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose constant weight narrows (more inputs than outputs): a BERT layer's FFN output projection. Its
    input, the GELU output, has the longest tail, which one fixed scale per tensor covers worst (ml-100k bundle: user
    cosine to FP32 0.9956 with them quantized, 0.9978 without; dynamic INT8 0.9962)."""
    weights = {w.name: tuple(w.dims) for w in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul"
            and any(len(weights.get(i, ())) == 2 and weights[i][0] > weights[i][1] for i in node.input)]


def quantize_static_int8(fp32_model: Path, out_dir: Path, calibration: CalibrationDataReader) -> dict[str, Path]:
    """The FP32 encoder -> the STATIC_MODELS under out_dir: the dynamic export's choices (export/onnx.py) with fixed
    scales. The activation ranges are calibrated once (onnxruntime's calibration cache) and shared."""
    models = {}
    with tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=True)
        excluded = down_projections(onnx.load(str(prepared), load_external_data=False))
        for name, ffn_fp32 in STATIC_MODELS.items():
            models[name] = out_dir / f"model_{name}.onnx"
            quantize_static(str(prepared), str(models[name]), calibration, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded if ffn_fp32 else None,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            # inputs only, as the dynamic model: a quantized output would add a rounding per MatMul
                            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]},
                            calibration_cache_path=Path(work) / "ranges.json")
    return models


def batch_effect(alone: np.ndarray, batched: np.ndarray) -> dict[str, float]:
    """How far unit vectors encoded inside batches are from the same texts encoded alone (rows aligned)."""
    cosine = np.sum(alone * batched, axis=1)
    return {"max_abs_difference": float(np.max(np.abs(alone - batched))),
            "min_cosine": float(cosine.min()),
            "bitwise_equal_share": float(np.mean(np.all(alone == batched, axis=1)))}


def top_k(queries: np.ndarray, rows: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """(users, k) row numbers of the exact inner-product top k of query_rows(queries) over item rows, best first."""
    scores = query_rows(queries) @ rows.T
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(best, np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1), axis=1)


def top_k_agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Mean share of the reference top k found in the other's, and the share of users whose top k is the same set."""
    overlap = np.array([len(set(a) & set(b)) / len(a) for a, b in zip(reference.tolist(), other.tolist())])
    return {"mean_overlap": float(overlap.mean()), "same_set_share": float(np.mean(overlap == 1.0))}


def _users(catalogue: Sequence[tuple[str, ItemFields]], count: int, seed: int, max_history_items: int,
           data: Path | None) -> list[str]:
    """Rendered user texts: real histories and timestamps from `data`, or random catalogue histories."""
    items = dict(catalogue)
    if data is not None:
        from bench.loadgen import build_workload  # the bench's workload: the same users as `make bench`

        cases = [(u.history, u.timestamp) for u in build_workload(data, count=count, seed=seed).users]
    else:
        rng = np.random.default_rng(seed)
        ids = [item_id for item_id, _ in catalogue]
        cases = [(rng.choice(ids, size=min(len(ids), HISTORY_ITEMS), replace=False).tolist(),
                  float(rng.uniform(8.8e8, 8.9e8))) for _ in range(count)]
    return [render_user(UserText([items[i] for i in history], RequestContext(timestamp=stamp)), max_history_items)
            for history, stamp in cases]


def _encode_alone(encoder: OnnxEncoder, rows: Sequence[Sequence[int]], max_tokens: int) -> np.ndarray:
    return np.concatenate([encoder.encode_tokens(*encoder.pad([row], max_tokens)) for row in rows])


def _encode_in_batches(encoder: OnnxEncoder, rows: Sequence[Sequence[int]], max_tokens: int, batch: int,
                       seed: int) -> np.ndarray:
    """Each row encoded in a batch of `batch` random others (the last batch may be smaller), back in row order."""
    order = np.random.default_rng(seed).permutation(len(rows))
    out = np.empty((len(rows), encoder.dimension), dtype=np.float32)
    for start in range(0, len(rows), batch):
        members = order[start : start + batch]
        out[members] = encoder.encode_tokens(*encoder.pad([rows[i] for i in members], max_tokens))
    return out


def _throughput(sessions: dict[tuple[str, int], OnnxEncoder], rows: Sequence[Sequence[int]], max_tokens: int,
                configs: Sequence[tuple[str, int, int, int]], rounds: int) -> list[dict]:
    """texts/s per (model, batch, threads, callers), configurations interleaved round by round."""
    padder = next(iter(sessions.values()))
    batches = {b: [padder.pad(rows[s : s + b], max_tokens) for s in range(0, len(rows), b)]
               for b in {c[1] for c in configs}}
    pool = concurrent.futures.ThreadPoolExecutor(max(c[3] for c in configs))
    rates: dict[tuple, list[float]] = {c: [] for c in configs}
    runs: dict[tuple, list[float]] = {c: [] for c in configs}

    def work(session: OnnxEncoder, part: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
        seconds = []
        for ids, mask in part:
            started = time.perf_counter()
            session.encode_tokens(ids, mask)
            seconds.append(time.perf_counter() - started)
        return seconds

    for number in range(rounds + 1):  # round 0 warms every session at every width up and is not counted
        for config in configs[number % len(configs):] + configs[: number % len(configs)]:
            model, batch, threads, callers = config
            parts = [batches[batch][c::callers] for c in range(callers)]
            started = time.perf_counter()
            seconds = [s for f in [pool.submit(work, sessions[model, threads], p) for p in parts] for s in f.result()]
            elapsed = time.perf_counter() - started
            if number:
                rates[config].append(len(rows) / elapsed)
                runs[config].extend(seconds)
    pool.shutdown()
    return [{"model": m, "batch": b, "threads": t, "callers": c,
             "texts_per_s_median": float(np.median(rates[m, b, t, c])),
             "texts_per_s_range": [float(np.min(rates[m, b, t, c])), float(np.max(rates[m, b, t, c]))],
             "run_ms_p50": float(np.percentile(runs[m, b, t, c], 50) * 1e3),
             "run_ms_p99": float(np.percentile(runs[m, b, t, c], 99) * 1e3), "runs": len(runs[m, b, t, c])}
            for m, b, t, c in configs]


def _machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "avx512_vnni": "avx512_vnni" in flags,
            "onnxruntime": metadata.version("onnxruntime-gpu"), "load_average": list(os.getloadavg())}


def main(
    bundle: Path = typer.Option(..., help="bundle directory: its FP32 model is quantized, its INT8 model compared"),
    data: Path | None = typer.Option(None, help="data set to take real users from; default: random histories"),
    out: Path = typer.Option(Path("reports/static-int8"), help="report directory"),
    users: int = typer.Option(300, min=TOP_K, help="evaluated users"),
    calibration_texts: int = typer.Option(300, min=2, help="calibration texts: half users, half items"),
    throughput_texts: int = typer.Option(128, min=2 * max(BATCHES), help="user texts per timed pass (cut to a "
                                                                             "multiple of 64: two callers, batch 32)"),
    rounds: int = typer.Option(7, min=1, help="interleaved throughput rounds"),
    seed: int = typer.Option(0),
) -> None:
    manifest = mf.read_manifest(bundle, verify_hashes=False)
    catalogue = read_items(bundle / mf.ITEMS_FILE)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = bundle / mf.TOKENIZER_FILE
    fp32 = OnnxEncoder(bundle / mf.MODEL_FP32_FILE, tokenizer)

    rng = np.random.default_rng(seed)
    items_order = rng.permutation(len(catalogue))
    calibration_items = [render_item(catalogue[i][1]) for i in items_order[: calibration_texts // 2]]
    calibration_users = _users(catalogue, calibration_texts - calibration_texts // 2, seed + 1,
                               manifest.max_history_items, None)
    started = time.perf_counter()
    static = quantize_static_int8(bundle / mf.MODEL_FP32_FILE, out, CalibrationTexts(
        fp32, [(calibration_users, manifest.max_user_tokens), (calibration_items, manifest.max_item_tokens)]))
    quantize_seconds = time.perf_counter() - started
    typer.echo(f"static INT8 models written in {quantize_seconds:.0f} s")

    models = {"fp32": bundle / mf.MODEL_FP32_FILE, "dynamic_int8": bundle / mf.MODEL_INT8_FILE, **static}
    sessions = {(name, threads): OnnxEncoder(path, tokenizer, intra_op_threads=threads, spinning="during-runs")
                for name, path in models.items() for threads in THREADS}
    wide = {name: sessions[name, max(THREADS)] for name in models}

    user_texts = _users(catalogue, users, seed + 2, manifest.max_history_items, data)
    item_texts = [render_item(fields) for _, fields in catalogue]
    width = max(manifest.max_user_tokens, manifest.max_item_tokens)
    user_rows = fp32.token_ids(user_texts, manifest.max_user_tokens)
    item_rows_tokens = fp32.token_ids(item_texts, manifest.max_item_tokens)
    # Batch independence on the users and as many catalogue items, mixed: short items padded to long users' widths.
    mixed = user_rows + [item_rows_tokens[i] for i in items_order[calibration_texts // 2:][:users]]

    served = np.load(bundle / mf.VECTORS_FILE)
    alone_users, alone_items, independence = {}, {}, {}
    for name, encoder in wide.items():
        alone_users[name] = _encode_alone(encoder, user_rows, width)
        alone_items[name] = _encode_alone(encoder, item_rows_tokens, width)
        alone_mixed = _encode_alone(encoder, mixed, width)
        batched = {b: _encode_in_batches(encoder, mixed, width, b, seed) for b in BATCHES}
        independence[name] = {str(b): batch_effect(alone_mixed, batched[b]) for b in BATCHES}
        # What batching does to the users' served top 10 (the bundle's rows), at the largest batch.
        independence[name]["top10_alone_vs_batch_32"] = top_k_agreement(
            top_k(alone_users[name], served), top_k(batched[max(BATCHES)][: len(user_rows)], served))
        typer.echo(f"{name}: batch independence {independence[name]}")

    reference_top = top_k(alone_users["fp32"], served)
    own_rows = {name: item_rows(vectors, np.zeros(len(vectors)), 1.0) for name, vectors in alone_items.items()}
    reference_own = top_k(alone_users["fp32"], own_rows["fp32"])
    quality = {}
    for name in ("dynamic_int8", *STATIC_MODELS):
        quality[name] = {
            "user_cosine_mean": float(np.mean(np.sum(alone_users[name] * alone_users["fp32"], axis=1))),
            "user_cosine_min": float(np.min(np.sum(alone_users[name] * alone_users["fp32"], axis=1))),
            "item_cosine_mean": float(np.mean(np.sum(alone_items[name] * alone_items["fp32"], axis=1))),
            "item_cosine_min": float(np.min(np.sum(alone_items[name] * alone_items["fp32"], axis=1))),
            "top10_served_rows": top_k_agreement(reference_top, top_k(alone_users[name], served)),
            "top10_own_item_vectors": top_k_agreement(reference_own, top_k(alone_users["fp32"], own_rows[name])),
        }
        typer.echo(f"{name}: quality against FP32 {quality[name]}")

    timed = user_rows[: throughput_texts - throughput_texts % (2 * max(BATCHES))]
    configs = [("dynamic_int8", 1, t, 1) for t in THREADS] + [("dynamic_int8", 1, 1, 2)]
    configs += [(m, b, t, 1) for m in ("dynamic_int8", *STATIC_MODELS) for b in BATCHES for t in THREADS]
    configs += [(m, 1, t, 1) for m in STATIC_MODELS for t in THREADS]
    configs += [(m, max(BATCHES), 1, 2) for m in STATIC_MODELS]
    configs += [("fp32", 1, max(THREADS), 1), ("fp32", max(BATCHES), max(THREADS), 1)]
    machine_before = _machine()
    throughput = _throughput(sessions, timed, width, configs, rounds)
    report = {
        "bundle": str(bundle), "bundle_version": manifest.bundle_version, "data": str(data) if data else None,
        "users": len(user_rows), "items": len(item_rows_tokens), "mixed_texts": len(mixed),
        "calibration": {"users": len(calibration_users), "items": len(calibration_items), "method": "MinMax",
                        "seconds": quantize_seconds},
        "mean_tokens": {"users": float(np.mean([len(r) for r in user_rows])),
                        "items": float(np.mean([len(r) for r in item_rows_tokens]))},
        "batch_independence": independence, "quality_vs_fp32": quality,
        "throughput": {"texts": len(timed), "rounds": rounds, "results": throughput},
        "machine": {"before_throughput": machine_before, "load_average_after": list(os.getloadavg())},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    typer.echo((out / "report.md").read_text())


def markdown(report: dict) -> str:
    lines = [f"# Static INT8 on CPU ({report['bundle_version']})", "",
             f"{report['users']} users ({report['data'] or 'random catalogue histories'}; mean "
             f"{report['mean_tokens']['users']:.0f} tokens), {report['items']} items (mean "
             f"{report['mean_tokens']['items']:.0f} tokens). Static models calibrated (MinMax) on "
             f"{report['calibration']['users']} other users and {report['calibration']['items']} other items, one "
             f"text per run, in {report['calibration']['seconds']:.0f} s.", "",
             f"## Batch independence ({report['mixed_texts']} texts, users and items mixed: alone vs in a batch)", "",
             "| model | batch | max abs difference | min cosine | bitwise equal |", "|---|---:|---:|---:|---:|"]
    for name, rows in report["batch_independence"].items():
        for batch in map(str, BATCHES):
            r = rows[batch]
            lines.append(f"| {name} | {batch} | {r['max_abs_difference']:.2e} | {r['min_cosine']:.6f} | "
                         f"{r['bitwise_equal_share']:.0%} |")
    lines += ["", "Users' top 10 over the served rows, alone vs in batches of 32:", "",
              "| model | mean overlap | same top 10 |", "|---|---:|---:|"]
    for name, rows in report["batch_independence"].items():
        r = rows["top10_alone_vs_batch_32"]
        lines.append(f"| {name} | {r['mean_overlap']:.4f} | {r['same_set_share']:.0%} |")
    lines += ["", "## Quality against FP32 (each text alone)", "",
              "| model | user cosine mean (min) | item cosine mean (min) | top 10 over served rows: overlap, same "
              "| top 10 over its own item vectors: overlap, same |", "|---|---:|---:|---:|---:|"]
    for name, q in report["quality_vs_fp32"].items():
        lines.append(f"| {name} | {q['user_cosine_mean']:.4f} ({q['user_cosine_min']:.4f}) | "
                     f"{q['item_cosine_mean']:.4f} ({q['item_cosine_min']:.4f}) | "
                     f"{q['top10_served_rows']['mean_overlap']:.3f}, {q['top10_served_rows']['same_set_share']:.0%} | "
                     f"{q['top10_own_item_vectors']['mean_overlap']:.3f}, "
                     f"{q['top10_own_item_vectors']['same_set_share']:.0%} |")
    t = report["throughput"]
    before = report["machine"]["before_throughput"]
    lines += ["", f"## Throughput ({t['texts']} user texts per pass, {t['rounds']} interleaved rounds)", "",
              f"{before['cpu']}, {before['cores']} cores, AVX-512 VNNI {before['avx512_vnni']}, onnxruntime "
              f"{before['onnxruntime']}; load average before {before['load_average'][0]:.2f}, after "
              f"{report['machine']['load_average_after'][0]:.2f}.", "",
              "| model | batch | intra-op threads x callers | texts/s median (range) | run p50 ms | run p99 ms |",
              "|---|---:|---|---:|---:|---:|"]
    for r in t["results"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} x {r['callers']} | "
                     f"{r['texts_per_s_median']:.1f} ({r['texts_per_s_range'][0]:.1f}-{r['texts_per_s_range'][1]:.1f})"
                     f" | {r['run_ms_p50']:.1f} | {r['run_ms_p99']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    typer.run(main)
