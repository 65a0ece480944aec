"""Fetch MovieLens-100K from the hash-pinned recbole wheel on PyPI and extract its atomic files."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import typer

_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")


def fetch(requirements: Path = typer.Option(..., help="pip requirements file pinning recbole with --hash"),
          out: Path = typer.Option(Path("data/ml-100k"), help="where to write the .inter/.item/.user files")) -> None:
    with tempfile.TemporaryDirectory() as download_dir:
        # --require-hashes: pip refuses a wheel whose sha256 differs from the pinned one.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
             "--only-binary=:all:", "-r", str(requirements), "-d", download_dir],
            check=True,
        )
        wheel = next(Path(download_dir).glob("recbole-*.whl"))
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            for name in _FILES:
                (out / name).write_bytes(archive.read(_MEMBER_DIR + name))
    typer.echo(f"MovieLens-100K written to {out}")


if __name__ == "__main__":
    typer.run(fetch)
