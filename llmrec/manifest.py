"""The model bundle: its file layout and manifest, the one contract between export/ and server/.

A bundle is a directory `<root>/<bundle_version>/` holding:
    manifest.json           this schema, with a sha256 for every file below
    manifest.sha256         the sha256 of manifest.json's exact bytes, in `sha256sum` format
                            ("<64 hex>  manifest.json\n"; check by hand with `sha256sum -c manifest.sha256`)
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
    model/cold_start.npy    float32 (dimension + 1, dimension + 1): the cold-start map (llmrec.cold_start) that
                            gives new items an id vector and a bias column from their text vector, if the
                            checkpoint has one (manifest cold_start_map true); its bias output is the index row's
                            bias column (temperature * bias)
    model/fast_user_map.npy float32 (features, dimension): the fast path's user map (llmrec.fast_user), if the
                            checkpoint has one (manifest fast_path.user_map true)
    model/ranker_int8.onnx  the ranking stage's cross-encoder (llmrec.ranking_stage), dynamic INT8, if the checkpoint
                            has one (manifest ranking_stage not null); it reads tokenizer/tokenizer.json too

Integrity: manifest.sha256 covers manifest.json, whose `files` cover every other file, so one chain of hashes
covers the whole bundle. The manifest digest is checked on every read (it is cheap); the file hashes unless
verify_hashes is off. A digest detects damaged or hand-edited bundles; it is not a signature (whoever can write
the bundle can rewrite both). To change a manifest on purpose, rewrite the digest too (`write_manifest_digest`).

Schema: `Manifest` below is the one definition, validated strictly (pydantic dataclasses, JSON mode): exact JSON
types (no "20" for an int, no 20.0 either, no bool for a number), finite floats, ranges (dimension > 0,
index_dimension == dimension + 1, weights >= 0, counts >= 1), bundle_version a plain name (it names the server's
state directory), `files` keyed by exactly the bundle's known relative paths, and no unknown or missing field.
Any violation is a BundleError with one line naming every bad field.

Fast path: fast_path, when present, holds the adjustments chosen on validation for a query without the encoder's
user vector (llmrec.scoring's rule over the catalogue's vectors alone, the same recencies and rejected weight): the
user vector is the user map's prediction from the history's item vectors (llmrec.fast_user) when user_map is true,
else zero (bundles exported before the map existed); the server serves catalogued-only requests with it
(docs/serving.md). Absent (bundles exported before it existed, or a checkpoint that never chose them): every request
takes the full path; such bundles stay valid and keep their digest.

Format 6 (this one) added manifest.sha256 and the strict schema; the server refuses every other format.

Scoring: vectors.npy rows are llmrec.scoring.item_rows; history_item_score and the cooccurrence, history_vector
and sequence_model weights and recencies, and rejected_item_weight, are the scoring rule the server applies
(Manifest.scoring_rule). rejected_item_weight may be absent (bundles exported before it existed): it then takes
llmrec.scoring.DEFAULT_REJECTED_WEIGHT, so those bundles stay valid and keep their digest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from llmrec.scoring import DEFAULT_REJECTED_WEIGHT, Adjustments, Recency, ScoringRule

FORMAT_VERSION = 6
MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST_FILE = "manifest.sha256"
MODEL_INT8_FILE = "model/model_int8.onnx"
MODEL_FP32_FILE = "model/model_fp32.onnx"
TOKENIZER_FILE = "tokenizer/tokenizer.json"
ITEMS_FILE = "items/items.jsonl"
VECTORS_FILE = "items/vectors.npy"
INDEX_FILE = "items/index.hnsw"
COOCCURRENCE_FILE = "items/cooccurrence.npz"
SEQUENCE_MODEL_FILE = "model/sequence_model.onnx"
COLD_START_FILE = "model/cold_start.npy"
FAST_USER_MAP_FILE = "model/fast_user_map.npy"
RANKER_FILE = "model/ranker_int8.onnx"
BUNDLE_FILES = (MODEL_INT8_FILE, MODEL_FP32_FILE, TOKENIZER_FILE, ITEMS_FILE, VECTORS_FILE, INDEX_FILE,
                COOCCURRENCE_FILE)
# A bundle version names directories (the bundle's and the server's state directory): a plain name, never a path.
BUNDLE_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class BundleError(Exception):
    """A bundle is missing, incomplete, corrupt or built for another template or format."""


# strict: JSON types must match exactly; extra="forbid": unknown fields are refused; no NaN or infinity anywhere.
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
Count = Annotated[int, Field(ge=1)]
Weight = Annotated[float, Field(ge=0)]  # weight 0 turns a term off; a negative weight would reward its opposite
Decay = Annotated[float, Field(gt=0, le=1)]  # recency weights decay**j, j = 0 for the latest item
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
BundleFile = Literal["model/model_int8.onnx", "model/model_fp32.onnx", "tokenizer/tokenizer.json",
                     "items/items.jsonl", "items/vectors.npy", "items/index.hnsw", "items/cooccurrence.npz",
                     "model/sequence_model.onnx", "model/cold_start.npy", "model/fast_user_map.npy",
                     "model/ranker_int8.onnx"]


@dataclass(config=_STRICT)
class IndexSpec:
    space: Literal["ip"]  # hnswlib space; "ip" because scores are inner products
    m: Annotated[int, Field(ge=2)]
    ef_construction: Count
    ef_search: Count


# A new bundle's index (export's defaults). ef_search 200, not 128: the fine-tuned user tower's queries sit further
# from the item vectors than the items from each other, and on make bench's 20,000-item derived catalogue recall@10
# against exact search was 0.988 at ef 128 and 0.9965 at 200 (M 32; M 16: 0.975 and 0.989); MovieLens' 1,682 items
# are exact at both.
DEFAULT_INDEX = IndexSpec(space="ip", m=32, ef_construction=200, ef_search=200)


@dataclass(config=_STRICT)
class CooccurrenceSpec:
    """How the server scores co-occurrence (llmrec.cooccurrence): weight 0 turns it off."""

    weight: Weight
    recent_items: Count
    recency_decay: Decay
    window: Count  # how the table was counted (for the record; serving reads the table)


@dataclass(config=_STRICT)
class HistoryVectorSpec:
    """How the server builds the history vector added to the query (llmrec.history_vector): weight 0 turns it off."""

    weight: Weight
    recent_items: Count
    recency_decay: Decay


@dataclass(config=_STRICT)
class SequenceModelSpec:
    """How the server adds the sequence model's vector to the query (llmrec.sequence_runner): weight 0 turns it off."""

    weight: Weight
    max_items: Count  # the most recent items it reads


@dataclass(config=_STRICT)
class FastPathSpec:
    """The adjustments of the fast path (no encoder run), chosen on validation by training/calibration.py's search
    (choose_fast_path), and whether its user vector comes from model/fast_user_map.npy (else it is zero).
    Recencies are the full path's."""

    history_item_score: float
    cooccurrence_weight: Weight
    history_vector_weight: Weight
    sequence_weight: Weight
    user_map: bool = False  # absent in bundles exported before the map existed: a zero user vector

    def adjustments(self) -> Adjustments:
        return Adjustments(self.history_item_score, self.cooccurrence_weight, self.history_vector_weight,
                           self.sequence_weight)

    @classmethod
    def of(cls, adjustments: Adjustments, user_map: bool = False) -> FastPathSpec:
        return cls(**dataclasses.asdict(adjustments), user_map=user_map)


@dataclass(config=_STRICT)
class RankingStageSpec:
    """The ranking stage (llmrec.ranking_stage): the cross-encoder re-scores the first stage's best `candidates`,
    score = first-stage score + weight * logit; weight and candidates chosen on validation
    (training/ranking_stage.py)."""

    weight: Weight
    candidates: Count
    max_length: Count  # tokens of a (user, item) pair


@dataclass(config=_STRICT)
class Manifest:
    bundle_version: str  # a plain name (BUNDLE_VERSION_PATTERN): it names the server's state directory
    created_at: str  # RFC 3339
    base_model: Annotated[str, Field(min_length=1)]
    template_version: Annotated[str, Field(min_length=1)]
    dimension: Count  # encoder output size
    index_dimension: Count  # dimension + 1 (bias column)
    item_count: Count
    max_user_tokens: Count
    max_item_tokens: Count
    max_history_items: Count
    new_item_bias: float  # bias column of items never trained on when there is no cold-start map
    history_item_score: float  # added to the score of items already in the user's history (training/calibration.py)
    cooccurrence: CooccurrenceSpec
    history_vector: HistoryVectorSpec
    sequence_model: SequenceModelSpec | None  # None: the bundle has no sequence model
    index: IndexSpec
    files: dict[BundleFile, Sha256]  # relative path -> sha256
    quality: dict[str, Any]  # export checks: INT8 vs PyTorch cosine and ranking agreement
    training: dict[str, Any]  # data set, config and evaluation of the checkpoint
    versions: dict[str, str]  # library versions that built the bundle
    # How far the items a user rejected pull the query away from them (llmrec.scoring); 0 turns it off.
    rejected_item_weight: Weight = DEFAULT_REJECTED_WEIGHT
    # The fast path's adjustments (module docstring); None: every request takes the full path.
    fast_path: FastPathSpec | None = None
    format_version: Literal[FORMAT_VERSION] = FORMAT_VERSION  # type: ignore[valid-type]
    # True: new items get their id vector and bias from model/cold_start.npy; false (or absent, as in bundles
    # exported before the map existed): a text vector alone and new_item_bias.
    cold_start_map: bool = False
    # The ranking stage (model/ranker_int8.onnx); None (or absent, as in bundles exported before it existed): none.
    ranking_stage: RankingStageSpec | None = None

    @field_validator("bundle_version")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(BUNDLE_VERSION_PATTERN, value):
            raise ValueError("must be a plain name of at most 128 letters, digits, '.', '_' and '-', starting with a "
                             f"letter or digit, not {_short(value)}")
        return value

    @field_validator("created_at")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("must be an RFC 3339 time, e.g. 2026-01-01T00:00:00+00:00") from None
        if parsed.tzinfo is None:
            raise ValueError("must carry a UTC offset (RFC 3339)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.index_dimension != self.dimension + 1:
            raise ValueError(f"index_dimension must be dimension + 1 = {self.dimension + 1} (the bias column), "
                             f"not {self.index_dimension}")
        want = set(self.required_files)
        if set(self.files) != want:
            missing, extra = sorted(want - set(self.files)), sorted(set(self.files) - want)
            raise ValueError("files must list exactly the bundle's files" + (f"; missing {missing}" if missing else "")
                             + (f"; not part of this bundle {extra}" if extra else ""))
        if self.fast_path is not None and self.fast_path.sequence_weight and self.sequence_model is None:
            raise ValueError("fast_path.sequence_weight needs the bundle's sequence model (sequence_model is null)")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Validate a decoded manifest against the schema (through its JSON form, so JSON's types are checked)."""
        try:
            text = json.dumps(data)
        except (TypeError, ValueError) as error:
            raise BundleError(f"manifest is not plain JSON ({error})") from error
        return _validate(text.encode(), MANIFEST_FILE)

    def scoring_rule(self) -> ScoringRule:
        """The scoring rule this bundle is served with (llmrec.scoring)."""
        sequence_weight = self.sequence_model.weight if self.sequence_model is not None else 0.0
        return ScoringRule(
            Adjustments(self.history_item_score, self.cooccurrence.weight, self.history_vector.weight, sequence_weight),
            cooccurrence_recency=Recency(self.cooccurrence.recent_items, self.cooccurrence.recency_decay),
            history_vector_recency=Recency(self.history_vector.recent_items, self.history_vector.recency_decay),
            rejected_weight=self.rejected_item_weight)

    def fast_scoring_rule(self) -> ScoringRule | None:
        """The rule of the fast path (no encoder run), or None when the bundle has none."""
        if self.fast_path is None:
            return None
        return dataclasses.replace(self.scoring_rule(), adjustments=self.fast_path.adjustments())

    @property
    def required_files(self) -> tuple[str, ...]:
        return bundle_files(self.sequence_model is not None, self.cold_start_map,
                            self.fast_path is not None and self.fast_path.user_map, self.ranking_stage is not None)


_MANIFEST = TypeAdapter(Manifest)


def _validate(data: bytes, where: str) -> Manifest:
    try:
        return _MANIFEST.validate_json(data, strict=True)
    except ValidationError as error:
        raise BundleError(f"{where} breaks the manifest schema: {_describe(error)}") from None


def _describe(error: ValidationError) -> str:
    """Every problem on one line: `field.sub: reason (got value)`."""
    problems = []
    for problem in error.errors(include_url=False):
        location = ".".join(str(part) for part in problem["loc"] if part != "[key]")
        message = problem["msg"].removeprefix("Value error, ")
        if not location:  # a check across fields: its message names them
            problems.append(message)
            continue
        if problem["loc"][-1:] == ("[key]",):
            field = ".".join(map(str, problem["loc"][:-2]))
            problems.append(f"{field}: {_short(problem.get('input'))} is not a bundle file")
        elif problem["type"] == "missing":
            problems.append(f"{location}: missing")
        elif problem["type"] == "unexpected_keyword_argument":
            problems.append(f"{location}: unknown field")
        elif problem["type"] == "value_error" or isinstance(problem.get("input"), (dict, list)):
            problems.append(f"{location}: {message}")
        elif problem["type"] == "string_pattern_mismatch" and problem["loc"][0] == "files":
            problems.append(f"{location}: not a sha256 (64 lower-case hex digits), got {_short(problem.get('input'))}")
        else:
            problems.append(f"{location}: {message} (got {_short(problem.get('input'))})")
    return "; ".join(problems)


def _short(value: Any) -> str:
    text = repr(value) if not (isinstance(value, float) and not math.isfinite(value)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bundle_files(with_sequence_model: bool, with_cold_start_map: bool = False,
                 with_fast_user_map: bool = False, with_ranker: bool = False) -> tuple[str, ...]:
    """Every file a bundle holds (besides manifest.json and manifest.sha256)."""
    return (BUNDLE_FILES + ((SEQUENCE_MODEL_FILE,) if with_sequence_model else ())
            + ((COLD_START_FILE,) if with_cold_start_map else ())
            + ((FAST_USER_MAP_FILE,) if with_fast_user_map else ()) + ((RANKER_FILE,) if with_ranker else ()))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    """Write manifest.json and its digest, manifest.sha256 (export's last step before the bundle is renamed)."""
    (Path(bundle_dir) / MANIFEST_FILE).write_text(manifest.to_json())
    write_manifest_digest(bundle_dir)


def write_manifest_digest(bundle_dir: Path) -> str:
    """(Re)write manifest.sha256 for manifest.json as it is now; returns the digest."""
    digest = hashlib.sha256((Path(bundle_dir) / MANIFEST_FILE).read_bytes()).hexdigest()
    (Path(bundle_dir) / MANIFEST_DIGEST_FILE).write_text(f"{digest}  {MANIFEST_FILE}\n")
    return digest


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def read_manifest(bundle_dir: Path, verify_hashes: bool = True) -> Manifest:
    """Read and check a bundle's manifest; raise BundleError with a readable one-line reason if anything is off.

    Order: manifest.json parses and is of this format; manifest.sha256 matches its bytes; the schema holds;
    every file is present and (verify_hashes) matches its sha256.
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: {MANIFEST_FILE} is missing")
    raw = path.read_bytes()
    try:
        data = json.loads(raw, object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle {bundle_dir} has format {data.get('format_version')!r}, which this server does not "
                          f"support (want {FORMAT_VERSION}); re-export it with this code")
    digest_path = bundle_dir / MANIFEST_DIGEST_FILE
    if not digest_path.is_file():
        raise BundleError(f"bundle {bundle_dir} lacks {MANIFEST_DIGEST_FILE}, the digest of its manifest; "
                          "re-export the bundle or restore the file")
    recorded = digest_path.read_text(errors="replace").split()
    actual = hashlib.sha256(raw).hexdigest()
    if not recorded or recorded[0].lower() != actual:
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST_FILE} does not match {MANIFEST_DIGEST_FILE} (the manifest "
                          "was edited or damaged); restore the bundle, or re-export it")
    manifest = _validate(raw, str(path))
    for relative in manifest.required_files:
        file = bundle_dir / relative
        if not file.is_file():
            raise BundleError(f"bundle {bundle_dir} lacks {relative}")
        if verify_hashes and sha256_file(file) != manifest.files[relative]:
            raise BundleError(f"bundle {bundle_dir}: {relative} does not match its sha256 in the manifest")
    return manifest


def latest_bundle(root: Path) -> Path:
    """The newest complete bundle under root (bundle versions sort by creation time)."""
    candidates = sorted(p.parent for p in Path(root).glob(f"*/{MANIFEST_FILE}"))
    if not candidates:
        raise BundleError(f"no bundle under {root}; run `make export` first")
    return candidates[-1]
