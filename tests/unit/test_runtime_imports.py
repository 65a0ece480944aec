"""The serving runtime must not pull in the training stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("torch", "transformers", "optimum")


def test_server_and_clients_do_not_import_the_training_stack():
    code = (
        "import sys, server.app, server.cli, server.bundle, clients.cli, clients.client\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_server_without_tracing_never_imports_opentelemetry():
    # Imported only when otlp_endpoint is set: the SDK, exporter and instrumentation cost ~0.5 s of start-up.
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from server.app import RecommenderServer\n"
        "from server.settings import ServerSettings\n"
        "async def main():\n"
        "    server = RecommenderServer(ServerSettings(bundle=Path('unused'), port=0, metrics_port=0))\n"
        "    await server.start()\n"
        "    await server.stop(grace=0)\n"
        "asyncio.run(main())\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_local_catalogue_store_works_without_the_postgres_driver(tmp_path):
    # psycopg is imported only by server.store.postgres: a server on the local journal needs none of it.
    code = (
        "import sys\n"
        "sys.modules['psycopg'] = None  # as if the driver were not installed\n"
        "from pathlib import Path\n"
        "import server.app\n"
        "from server.settings import ServerSettings\n"
        "from server.store import store_for\n"
        "class Manifest:\n"
        "    bundle_version, index_dimension = 'v1', 3\n"
        f"settings = ServerSettings(bundle=Path('unused'), state_dir=Path({str(tmp_path)!r}))\n"
        "print(type(store_for(settings, Manifest())).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "LocalStore", result.stdout + result.stderr
