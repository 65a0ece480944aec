"""Build hook: the gRPC stubs in llmrec/v1/ are generated from protos/ by the build, never committed.

A wheel gets them in its build directory; an editable install (`pip install -e .`) writes them into the
source tree, where the editable package is imported from. `make proto` calls generate_stubs() as well, so
there is one protoc invocation. Everything else is configured in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
PROTOS = ("llmrec/v1/recommender.proto",)  # relative to PROTO_ROOT
STUBS = ("llmrec/v1/recommender_pb2.py", "llmrec/v1/recommender_pb2_grpc.py", "llmrec/v1/recommender_pb2.pyi")


def generate_stubs(out_dir: str | Path = ROOT) -> list[Path]:
    """Run protoc (grpcio-tools, a build requirement) on PROTOS; returns the stub files under out_dir."""
    from grpc_tools import protoc  # imported here: `import setup` must not need it

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = protoc._get_resource_file_name("grpc_tools", "_proto")  # google/protobuf/timestamp.proto
    googleapis = _googleapis_protos()  # google/rpc/status.proto
    status = protoc.main([
        "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"-I{googleapis}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}",
        *(str(PROTO_ROOT / proto) for proto in PROTOS),
    ])
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {', '.join(PROTOS)}")
    return [out_dir / stub for stub in STUBS]


def _googleapis_protos() -> Path:
    """The import root of the .proto files googleapis-common-protos ships (a build requirement, and a runtime one:
    the stubs import google.rpc.status_pb2)."""
    import importlib.util

    spec = importlib.util.find_spec("google.rpc.status_pb2")
    if spec is None or spec.origin is None:
        raise RuntimeError("googleapis-common-protos is needed to build the stubs (google/rpc/status.proto)")
    root = Path(spec.origin).parents[2]  # <root>/google/rpc/status_pb2.py
    if not (root / "google" / "rpc" / "status.proto").is_file():
        raise RuntimeError(f"googleapis-common-protos under {root} ships no google/rpc/status.proto")
    return root


class BuildPyWithStubs(build_py):
    """build_py plus the generated llmrec.v1 package (which is therefore not in pyproject's package list)."""

    def run(self) -> None:
        super().run()
        generate_stubs(ROOT if self.editable_mode else self.build_lib)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return [*outputs, *(str(Path(self.build_lib) / stub) for stub in STUBS)]

    def get_source_files(self) -> list[str]:
        # what an sdist must carry to build the stubs again
        return [*super().get_source_files(), *(f"protos/{proto}" for proto in PROTOS)]


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__
    setup(cmdclass={"build_py": BuildPyWithStubs})
