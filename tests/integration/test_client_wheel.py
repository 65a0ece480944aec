"""The client anyone can pip-install: a wheel built from a clean copy of the checkout (no generated stubs in
it), installed with only its base dependencies in a fresh venv, talks to a real server.

Needs pip to reach the package index (the base dependencies come from it, pinned by the constraints file) and
setuptools + grpcio-tools in this venv (the wheel is built without build isolation, so offline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
STUBS = ("llmrec/v1/recommender_pb2.py", "llmrec/v1/recommender_pb2_grpc.py", "llmrec/v1/recommender_pb2.pyi")
SERVER_RUNTIME = ("numpy", "onnxruntime", "torch", "hnswlib")
# what a fresh clone lacks, when git cannot say (ignored paths: .gitignore)
NOT_CHECKED_IN = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "build", "data", "runs", "bundles",
                  "reports", "state")


def run(command: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def copy_checkout(target: Path) -> None:
    """The files a fresh clone of the working tree would have: tracked and untracked, never ignored ones."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(*NOT_CHECKED_IN), symlinks=True)
        shutil.rmtree(target / "llmrec" / "v1", ignore_errors=True)
        return
    for relative in filter(None, listed):
        source = ROOT / relative
        if source.is_file():  # tracked files deleted in the working tree are listed too
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / relative)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel and the base (client) dependencies only; returns its bin directory."""
    work = tmp_path_factory.mktemp("client-wheel")
    checkout = work / "checkout"
    copy_checkout(checkout)
    assert not (checkout / "llmrec" / "v1").exists(), "generated stubs must not be in the checkout"

    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir",
         work / "dist", checkout], cwd=work)
    (wheel,) = (work / "dist").glob("llmrec-*.whl")
    assert set(STUBS) <= set(zipfile.ZipFile(wheel).namelist()), "the build must generate the gRPC stubs"

    run([sys.executable, "-m", "venv", work / "venv"], cwd=work)
    bin_dir = work / "venv" / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", CONSTRAINTS,
         wheel], cwd=work, timeout=600)
    return bin_dir


def test_the_client_install_has_no_server_runtime(client_venv: Path, tmp_path: Path):
    code = (
        "import importlib.util, json, sys\n"
        "import llmrec.clients.client, llmrec.clients.cli\n"
        f"present = [m for m in {SERVER_RUNTIME!r} if importlib.util.find_spec(m) is not None]\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_RUNTIME!r})\n"
        "print(json.dumps({'present': present, 'loaded': loaded, 'file': llmrec.clients.client.__file__}))\n"
    )
    found = json.loads(run([client_venv / "python", "-c", code], cwd=tmp_path).stdout)
    assert found["present"] == [] and found["loaded"] == []
    assert Path(found["file"]).is_relative_to(client_venv.parent), "imported the checkout, not the wheel"

    server = subprocess.run([client_venv / "llmrec-server", "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert server.returncode == 1 and "Traceback" not in server.stderr
    assert "pip install 'llmrec[server]'" in server.stderr


def test_the_installed_client_and_cli_talk_to_a_server(client_venv: Path, server, tiny_catalogue, tmp_path: Path):
    catalogue_ids = {item_id for item_id, _ in tiny_catalogue}
    code = (
        "import json, sys\n"
        "from llmrec.clients.client import RecommenderClient\n"
        "with RecommenderClient(sys.argv[1], timeout_s=30) as client:\n"
        "    result = client.recommend(['m1', 'm2'], k=3, exclude_history=True)\n"
        "print(json.dumps([item.item_id for item in result.items]))\n"
    )
    ids = json.loads(run([client_venv / "python", "-c", code, server.target], cwd=tmp_path, timeout=60).stdout)
    assert len(ids) == 3 and set(ids) <= catalogue_ids - {"m1", "m2"}

    cli = run([client_venv / "llmrec", "recommend", "--target", server.target, "--item", "m1", "--item", "m2",
               "--k", "3", "--exclude-history", "--json"], cwd=tmp_path, timeout=60)
    result = json.loads(cli.stdout)
    assert [item["item_id"] for item in result["items"]] == ids
    assert result["model_version"] and [item["rank"] for item in result["items"]] == [1, 2, 3]
