"""The model bundle: its file layout and manifest, the one contract between export/ and server/.

A bundle is a directory `<root>/<bundle_version>/` holding:
    manifest.json           this schema, with a sha256 for every file below
    model/model_int8.onnx   encoder, dynamic INT8 (served on CPU)
    model/model_fp32.onnx   encoder, FP32 (served on CUDA, where dynamic INT8 has no fast path)
    tokenizer/tokenizer.json
    items/items.jsonl       one item record a line (llmrec.item_record): {"id", "title", "categories", "brand",
                            "description"}
    items/vectors.npy       float32 (item_count, index_dimension): unit text+id vector, then the bias column;
                            text vectors by model_fp32.onnx (the catalogue is encoded once, offline)
    items/index.hnsw        hnswlib index over vectors.npy, inner-product space, labels = row numbers
    items/cooccurrence.npz  item co-occurrence table over row numbers (llmrec.cooccurrence; empty if untrained)
    model/sequence_model.onnx  the sequence model over item vectors (llmrec.sequence_runner), if the checkpoint
                            has one (manifest sequence_model not null)

Scoring: vectors.npy rows are llmrec.scoring.item_rows; history_item_score and the cooccurrence, history_vector
and sequence_model weights and recencies are the scoring rule the server applies (Manifest.scoring_rule).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from llmrec.scoring import Adjustments, Recency, ScoringRule

FORMAT_VERSION = 5
MANIFEST_FILE = "manifest.json"
MODEL_INT8_FILE = "model/model_int8.onnx"
MODEL_FP32_FILE = "model/model_fp32.onnx"
TOKENIZER_FILE = "tokenizer/tokenizer.json"
ITEMS_FILE = "items/items.jsonl"
VECTORS_FILE = "items/vectors.npy"
INDEX_FILE = "items/index.hnsw"
COOCCURRENCE_FILE = "items/cooccurrence.npz"
SEQUENCE_MODEL_FILE = "model/sequence_model.onnx"
BUNDLE_FILES = (MODEL_INT8_FILE, MODEL_FP32_FILE, TOKENIZER_FILE, ITEMS_FILE, VECTORS_FILE, INDEX_FILE,
                COOCCURRENCE_FILE)


class BundleError(Exception):
    """A bundle is missing, incomplete, corrupt or built for another template or format."""


@dataclasses.dataclass
class IndexSpec:
    space: str  # hnswlib space; "ip" because scores are inner products
    m: int
    ef_construction: int
    ef_search: int


@dataclasses.dataclass
class CooccurrenceSpec:
    """How the server scores co-occurrence (llmrec.cooccurrence): weight 0 turns it off."""

    weight: float
    recent_items: int
    recency_decay: float
    window: int  # how the table was counted (for the record; serving reads the table)


@dataclasses.dataclass
class HistoryVectorSpec:
    """How the server builds the history vector added to the query (llmrec.history_vector): weight 0 turns it off."""

    weight: float
    recent_items: int
    recency_decay: float


@dataclasses.dataclass
class SequenceModelSpec:
    """How the server adds the sequence model's vector to the query (llmrec.sequence_runner): weight 0 turns it off."""

    weight: float
    max_items: int  # the most recent items it reads


@dataclasses.dataclass
class Manifest:
    bundle_version: str
    created_at: str  # RFC 3339
    base_model: str
    template_version: str
    dimension: int  # encoder output size
    index_dimension: int  # dimension + 1 (bias column)
    item_count: int
    max_user_tokens: int
    max_item_tokens: int
    max_history_items: int
    new_item_bias: float  # bias given to items that were never trained on (cold items)
    history_item_score: float  # added to the score of items already in the user's history (training/calibration.py)
    cooccurrence: CooccurrenceSpec
    history_vector: HistoryVectorSpec
    sequence_model: SequenceModelSpec | None  # None: the bundle has no sequence model
    index: IndexSpec
    files: dict[str, str]  # relative path -> sha256
    quality: dict[str, Any]  # export checks: INT8 vs PyTorch cosine and ranking agreement
    training: dict[str, Any]  # data set, config and evaluation of the checkpoint
    versions: dict[str, str]  # library versions that built the bundle
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise BundleError(f"manifest has unknown fields {sorted(unknown)}")
        return cls(**{**data, "index": IndexSpec(**data["index"]),
                      "cooccurrence": CooccurrenceSpec(**data["cooccurrence"]),
                      "history_vector": HistoryVectorSpec(**data["history_vector"]),
                      "sequence_model": SequenceModelSpec(**data["sequence_model"]) if data.get("sequence_model")
                      else None})

    def scoring_rule(self) -> ScoringRule:
        """The scoring rule this bundle is served with (llmrec.scoring)."""
        sequence_weight = self.sequence_model.weight if self.sequence_model is not None else 0.0
        return ScoringRule(
            Adjustments(self.history_item_score, self.cooccurrence.weight, self.history_vector.weight, sequence_weight),
            cooccurrence_recency=Recency(self.cooccurrence.recent_items, self.cooccurrence.recency_decay),
            history_vector_recency=Recency(self.history_vector.recent_items, self.history_vector.recency_decay))

    @property
    def required_files(self) -> tuple[str, ...]:
        return bundle_files(self.sequence_model is not None)


def bundle_files(with_sequence_model: bool) -> tuple[str, ...]:
    """Every file a bundle holds."""
    return BUNDLE_FILES + ((SEQUENCE_MODEL_FILE,) if with_sequence_model else ())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle_dir: Path, verify_hashes: bool = True) -> Manifest:
    """Read and check a bundle's manifest; raise BundleError with a readable reason if anything is off."""
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: {MANIFEST_FILE} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from error
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle format {data.get('format_version')} is not supported (want {FORMAT_VERSION})")
    manifest = Manifest.from_dict(data)
    for relative in manifest.required_files:
        file = Path(bundle_dir) / relative
        if not file.is_file():
            raise BundleError(f"bundle {bundle_dir} lacks {relative}")
        if verify_hashes and sha256_file(file) != manifest.files.get(relative):
            raise BundleError(f"bundle {bundle_dir}: {relative} does not match its sha256 in the manifest")
    return manifest


def latest_bundle(root: Path) -> Path:
    """The newest complete bundle under root (bundle versions sort by creation time)."""
    candidates = sorted(p.parent for p in Path(root).glob(f"*/{MANIFEST_FILE}"))
    if not candidates:
        raise BundleError(f"no bundle under {root}; run `make export` first")
    return candidates[-1]
