"""The gRPC server (`llmrec-server`). It needs the `server` extra: pip install 'llmrec[server]'."""

import importlib.util as _util
import sys as _sys

# import name -> distribution in the `server` extra. find_spec only looks: nothing is loaded here.
_RUNTIME = {"numpy": "numpy", "onnxruntime": "onnxruntime-gpu", "tokenizers": "tokenizers", "hnswlib": "hnswlib",
            "prometheus_client": "prometheus-client", "grpc_reflection": "grpcio-reflection",
            "pydantic_settings": "pydantic-settings"}
_missing = [dist for module, dist in _RUNTIME.items() if _util.find_spec(module) is None]
if _missing:
    _message = f"llmrec.server needs the server extra (missing {', '.join(_missing)}): pip install 'llmrec[server]'"
    if _sys.argv and _sys.argv[0].endswith("llmrec-server"):  # the console script: a message, not a traceback
        raise SystemExit(f"llmrec-server: {_message}")
    raise ImportError(_message)
