"""Load a model bundle (llmrec.manifest layout) into memory: encoder, catalogue and the prebuilt HNSW index."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hnswlib
import numpy as np

from llmrec import manifest as mf
from llmrec.cold_start import ColdStartMap
from llmrec.fast_user import FastUserMap
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.item_record import read_items
from llmrec.onnx_encoder import OnnxEncoder, choose_providers
from llmrec.ranking_stage import PairScorer
from llmrec.sequence_runner import SequenceRunner
from llmrec.template import TEMPLATE_VERSION, ItemFields

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedBundle:
    """Everything the server reads from a bundle, checked for consistency.

    Attributes:
        path: the bundle directory.
        manifest: its manifest (schema and digest always checked, file hashes unless asked not to).
        encoder: the ONNX encoder: INT8 on CPU, FP32 on CUDA.
        precision: "int8" or "fp32", whichever model file the encoder runs.
        item_ids: catalogue ids in row order; row numbers are the index labels.
        items: catalogue text in row order.
        row_of: item id -> row number.
        index: the hnswlib index, loaded (never rebuilt), ef set so that ef >= k for every allowed k.
        vectors: the index rows (memory-mapped); server.catalogue copies them into the live catalogue.
        cooccurrence: the item co-occurrence table over row numbers (llmrec.cooccurrence).
        sequence_model: the sequence model over item vectors, or None if the bundle has none.
        cold_start: the map from a new item's text vector to its id vector and bias column (llmrec.cold_start),
            or None if the bundle has none (new items then get new_item_bias).
        fast_user_map: the fast path's user vector from the history's item vectors (llmrec.fast_user), or None
            (the fast path then ranks with a zero user vector).
        ranker: the ranking stage's cross-encoder (llmrec.ranking_stage), or None if the bundle has none.
    """

    path: Path
    manifest: mf.Manifest
    encoder: OnnxEncoder
    precision: str
    item_ids: list[str]
    items: list[ItemFields]
    row_of: dict[str, int]
    index: hnswlib.Index
    vectors: np.ndarray
    cooccurrence: CooccurrenceTable
    sequence_model: SequenceRunner | None
    cold_start: ColdStartMap | None = None
    fast_user_map: FastUserMap | None = None
    ranker: PairScorer | None = None

    @property
    def model_version(self) -> str:
        return self.manifest.bundle_version

    @property
    def index_version(self) -> str:
        """`<bundle_version>:<item_count>`: the index is built with the bundle, so the bundle names it too;
        the item count makes catalogue size visible in every response."""
        return f"{self.manifest.bundle_version}:{len(self.item_ids)}"

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        prefer_gpu: bool = True,
        intra_op_threads: int = 0,
        spinning: str | None = None,
        min_ef: int = 0,
        verify_hashes: bool = True,
    ) -> LoadedBundle:
        """Read, verify and load a bundle.

        Args:
            path: the bundle directory (holding manifest.json).
            prefer_gpu: use CUDA and the FP32 model when available.
            intra_op_threads: ONNX Runtime intra-op threads (0 = cores available).
            spinning: when idle ONNX Runtime threads busy-wait (llmrec.onnx_encoder.SPINNING; None = its default).
            min_ef: lower bound for the HNSW search ef; pass max_k so that ef >= k always holds.
            verify_hashes: check file hashes against the manifest.

        Raises:
            BundleError: the bundle is missing, corrupt, inconsistent or built for another template version.
        """
        path = Path(path)
        manifest = mf.read_manifest(path, verify_hashes=verify_hashes)
        if manifest.template_version != TEMPLATE_VERSION:
            raise mf.BundleError(
                f"bundle {path} was built with text template version {manifest.template_version!r} but this "
                f"server renders version {TEMPLATE_VERSION!r}; re-export the bundle with this code"
            )

        providers = choose_providers(prefer_gpu)
        # Dynamic INT8 has no fast path on CUDA; FP32 is the GPU model, INT8 the CPU one.
        precision = "fp32" if providers[0] == "CUDAExecutionProvider" else "int8"
        model_file = mf.MODEL_FP32_FILE if precision == "fp32" else mf.MODEL_INT8_FILE
        try:
            encoder = OnnxEncoder(path / model_file, path / mf.TOKENIZER_FILE, providers, intra_op_threads,
                                  spinning=spinning)
        except Exception as error:  # onnxruntime and tokenizers raise their own types for unreadable files
            raise mf.BundleError(f"bundle {path}: unreadable {model_file} or {mf.TOKENIZER_FILE} "
                                 f"({one_line(error)})") from error
        if encoder.dimension != manifest.dimension:
            raise mf.BundleError(f"bundle {path}: encoder outputs {encoder.dimension} dims, manifest says "
                                 f"{manifest.dimension}")

        item_ids, items = _read_items(path / mf.ITEMS_FILE)
        if len(item_ids) != manifest.item_count:
            raise mf.BundleError(f"bundle {path}: {len(item_ids)} items, manifest says {manifest.item_count}")
        row_of = {item_id: row for row, item_id in enumerate(item_ids)}
        if len(row_of) != len(item_ids):
            raise mf.BundleError(f"bundle {path}: item ids are not unique")

        try:
            vectors = np.load(path / mf.VECTORS_FILE, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise mf.BundleError(f"bundle {path}: unreadable {mf.VECTORS_FILE} ({one_line(error)})") from error
        if vectors.shape != (manifest.item_count, manifest.index_dimension):
            raise mf.BundleError(f"bundle {path}: vectors have shape {vectors.shape}, want "
                                 f"{(manifest.item_count, manifest.index_dimension)}")

        try:
            cooccurrence = CooccurrenceTable.load(path / mf.COOCCURRENCE_FILE)
        except (OSError, ValueError, KeyError) as error:
            raise mf.BundleError(f"bundle {path}: unreadable {mf.COOCCURRENCE_FILE} ({one_line(error)})") from error
        if cooccurrence.num_items != manifest.item_count:
            raise mf.BundleError(f"bundle {path}: co-occurrence table covers {cooccurrence.num_items} items, "
                                 f"manifest says {manifest.item_count}")

        sequence_model = None
        if manifest.sequence_model is not None:
            try:
                sequence_model = SequenceRunner(path / mf.SEQUENCE_MODEL_FILE, manifest.sequence_model.max_items)
            except Exception as error:  # onnxruntime raises its own types for unreadable graphs
                raise mf.BundleError(f"bundle {path}: unreadable {mf.SEQUENCE_MODEL_FILE} ({one_line(error)})") \
                    from error
            if sequence_model.dimension != manifest.dimension:
                raise mf.BundleError(f"bundle {path}: the sequence model reads {sequence_model.dimension} dims, "
                                     f"manifest says {manifest.dimension}")

        cold_start = _load_matrix(path, mf.COLD_START_FILE, ColdStartMap, manifest.dimension) \
            if manifest.cold_start_map else None
        fast_user_map = _load_matrix(path, mf.FAST_USER_MAP_FILE, FastUserMap, manifest.dimension) \
            if manifest.fast_path is not None and manifest.fast_path.user_map else None

        ranker = None
        if manifest.ranking_stage is not None:
            try:
                ranker = PairScorer(path / mf.RANKER_FILE, path / mf.TOKENIZER_FILE, manifest.ranking_stage.max_length,
                                    intra_op_threads)
            except Exception as error:  # onnxruntime and tokenizers raise their own types for unreadable files
                raise mf.BundleError(f"bundle {path}: unreadable {mf.RANKER_FILE} ({one_line(error)})") from error

        index = hnswlib.Index(space=manifest.index.space, dim=manifest.index_dimension)
        try:
            index.load_index(str(path / mf.INDEX_FILE), max_elements=manifest.item_count)
        except (RuntimeError, OSError, ValueError) as error:
            raise mf.BundleError(f"bundle {path}: unreadable {mf.INDEX_FILE} ({one_line(error)})") from error
        if index.get_current_count() != manifest.item_count:
            raise mf.BundleError(f"bundle {path}: index holds {index.get_current_count()} items, manifest says "
                                 f"{manifest.item_count}")
        # Set once at load: set_ef is index-wide state, so changing it per request would race.
        index.set_ef(max(manifest.index.ef_search, min_ef))
        # Filtered queries call back into Python for every candidate; more threads would only fight for the GIL.
        index.set_num_threads(1)

        logger.info("loaded bundle %s: %d items, %s on %s, template v%s", manifest.bundle_version,
                    manifest.item_count, precision, encoder.provider, manifest.template_version)
        return cls(path, manifest, encoder, precision, item_ids, items, row_of, index, vectors, cooccurrence,
                   sequence_model, cold_start, fast_user_map, ranker)


def _read_items(path: Path) -> tuple[list[str], list[ItemFields]]:
    try:
        catalogue = read_items(path)
    except ValueError as error:  # "<path>:<line>: not a valid item record (...)"
        raise mf.BundleError(str(error)) from error
    return [item_id for item_id, _ in catalogue], [fields for _, fields in catalogue]


def _load_matrix(bundle: Path, relative: str, kind: type[ColdStartMap] | type[FastUserMap],
                 dimension: int) -> ColdStartMap | FastUserMap:
    """A bundle's .npy map (ColdStartMap, FastUserMap: they check their own shape) whose vectors have the manifest's
    dimension."""
    try:
        loaded = kind(np.load(bundle / relative))
    except (OSError, ValueError) as error:
        raise mf.BundleError(f"bundle {bundle}: unreadable {relative} ({one_line(error)})") from error
    if loaded.dimension != dimension:
        raise mf.BundleError(f"bundle {bundle}: {relative} is for {loaded.dimension}-dim vectors, manifest says "
                             f"{dimension}")
    return loaded


def one_line(error: BaseException) -> str:
    """An error's text on one line (the server prints a BundleError to the operator as one line)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
