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
