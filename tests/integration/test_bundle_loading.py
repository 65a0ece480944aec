"""LoadedBundle against the real tiny bundle, and the bundles it must refuse."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from llmrec import manifest as mf
from llmrec.template import TEMPLATE_VERSION
from llmrec.server.bundle import LoadedBundle
from llmrec.server.cli import app as server_app


def test_loads_the_tiny_bundle(tiny_bundle, tiny_catalogue):
    ef_search = mf.read_manifest(tiny_bundle, verify_hashes=False).index.ef_search
    bundle = LoadedBundle.load(tiny_bundle, prefer_gpu=False, min_ef=ef_search + 50)
    assert bundle.item_ids == [item_id for item_id, _ in tiny_catalogue]
    assert bundle.items[0] == tiny_catalogue[0][1]
    assert bundle.precision == "int8" and bundle.encoder.provider == "CPUExecutionProvider"
    assert bundle.index.ef == ef_search + 50  # raised to max_k so that ef >= k for every allowed k
    assert bundle.index.get_current_count() == 42
    assert bundle.vectors.shape == (42, bundle.manifest.dimension + 1)
    # The index was loaded, not rebuilt: its stored rows are the bundle's vectors.
    np.testing.assert_allclose(np.asarray(bundle.index.get_items([0, 41])), bundle.vectors[[0, 41]], atol=1e-6)


def test_refuses_a_bundle_built_for_another_template(bundle_copy):
    other = bundle_copy(template_version=TEMPLATE_VERSION + "-old")
    with pytest.raises(mf.BundleError, match="template version"):
        LoadedBundle.load(other, prefer_gpu=False)


def test_refuses_a_tampered_bundle(bundle_copy):
    tampered = bundle_copy(copy=(mf.ITEMS_FILE,))
    with (tampered / mf.ITEMS_FILE).open("a") as handle:
        handle.write('{"id": "extra", "title": "Extra (2000)"}\n')
    with pytest.raises(mf.BundleError, match="sha256"):
        LoadedBundle.load(tampered, prefer_gpu=False)


def test_refuses_items_that_disagree_with_the_manifest(bundle_copy):
    inconsistent = bundle_copy(item_count=41)
    with pytest.raises(mf.BundleError, match="42 items"):
        LoadedBundle.load(inconsistent, prefer_gpu=False)


def test_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    with pytest.raises(mf.BundleError, match="not a bundle"):
        LoadedBundle.load(tmp_path, prefer_gpu=False)


# --- the manifest schema and digest (llmrec.manifest): every defect the fault probe found -------------------------

def test_export_writes_the_manifest_digest(tiny_bundle):
    digest = (tiny_bundle / mf.MANIFEST_DIGEST_FILE).read_text()
    assert digest == f"{hashlib.sha256((tiny_bundle / mf.MANIFEST_FILE).read_bytes()).hexdigest()}  manifest.json\n"
    assert mf.read_manifest(tiny_bundle, verify_hashes=False).format_version == mf.FORMAT_VERSION == 6


def test_refuses_a_manifest_edited_without_its_digest(bundle_copy):
    edited = bundle_copy()
    path = edited / mf.MANIFEST_FILE
    path.write_text(path.read_text().replace('"max_history_items": 20', '"max_history_items": 21'))
    with pytest.raises(mf.BundleError, match=r"manifest.json does not match manifest.sha256 \(the manifest was edited "
                                             r"or damaged\)"):
        LoadedBundle.load(edited, prefer_gpu=False, verify_hashes=False)  # checked even without file hashes
    (edited / mf.MANIFEST_DIGEST_FILE).unlink()
    with pytest.raises(mf.BundleError, match="lacks manifest.sha256"):
        mf.read_manifest(edited)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"history_item_score": float("nan")}, r"history_item_score: Input should be a finite number \(got nan\)"),
    ({"new_item_bias": float("inf")}, r"new_item_bias: Input should be a finite number"),
    ({"max_history_items": "20"}, r"max_history_items: Input should be a valid integer \(got '20'\)"),
    ({"max_history_items": 20.0}, r"max_history_items: Input should be a valid integer"),
    ({"dimension": True}, r"dimension: Input should be a valid integer"),
    ({"item_count": 0}, r"item_count: Input should be greater than or equal to 1"),
    ({"index_dimension": 384}, r"index_dimension must be dimension \+ 1 = 385"),
    ({"bundle_version": "../../x"}, r"bundle_version: must be a plain name"),
    ({"bundle_version": ".hidden"}, r"bundle_version: must be a plain name"),
    ({"cooccurrence": {"weight": -0.5, "recent_items": 10, "recency_decay": 0.8, "window": 3}},
     r"cooccurrence.weight: Input should be greater than or equal to 0"),
    ({"history_vector": {"weight": 0.1, "recent_items": 20, "recency_decay": 1.5}},
     r"history_vector.recency_decay: Input should be less than or equal to 1"),
    ({"index": {"space": "l2", "m": 32, "ef_construction": 200, "ef_search": 128}}, r"index.space"),
    ({"sequence_model": {"weight": 1.0, "max_items": 50}}, r"files must list exactly .* missing \['model/sequence"),
    ({"created_at": "yesterday"}, r"created_at: must be an RFC 3339 time"),
    ({"surprise": 1}, r"surprise: unknown field"),
])
def test_refuses_a_manifest_that_breaks_the_schema(bundle_copy, changes, reason):
    broken = bundle_copy(**changes)  # digest rewritten: only the schema can catch these
    with pytest.raises(mf.BundleError, match=reason) as refused:
        LoadedBundle.load(broken, prefer_gpu=False)
    assert "\n" not in str(refused.value)


def test_refuses_files_outside_the_bundle_layout(bundle_copy, tiny_bundle):
    files = mf.read_manifest(tiny_bundle, verify_hashes=False).files
    broken = bundle_copy(files={**files, "../../etc/passwd": "0" * 64})
    with pytest.raises(mf.BundleError, match=r"files: '../../etc/passwd' is not a bundle file"):
        mf.read_manifest(broken)
    broken = bundle_copy(files={**files, mf.ITEMS_FILE: "not-a-sha"})
    with pytest.raises(mf.BundleError, match=r"files.items/items.jsonl: not a sha256"):
        mf.read_manifest(broken)


def test_a_missing_key_is_one_clear_line_not_a_traceback(bundle_copy):
    broken = bundle_copy()
    path = broken / mf.MANIFEST_FILE
    data = json.loads(path.read_text())
    del data["max_history_items"], data["index"]
    path.write_text(json.dumps(data))
    mf.write_manifest_digest(broken)
    with pytest.raises(mf.BundleError, match=r"^\S+ breaks the manifest schema: (max_history_items: missing; index: "
                                             r"missing|index: missing; max_history_items: missing)$"):
        mf.read_manifest(broken)
    result = CliRunner().invoke(server_app, ["--bundle", str(broken), "--port", "0", "--cpu-only"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmrec-server: cannot serve the bundle: ")
    assert "max_history_items: missing" in lines[0]


def test_refuses_a_bundle_of_another_format(bundle_copy):
    old = bundle_copy(format_version=5)
    with pytest.raises(mf.BundleError, match="has format 5, which this server does not support"):
        mf.read_manifest(old)
