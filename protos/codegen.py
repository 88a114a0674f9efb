"""Generate the Python gRPC stubs for every ``protos/*.proto``.

Run from anywhere as ``python -m protos.codegen [--out DIR]``. The repository root is the
protoc include path, so each generated module names its file ``protos/<name>.proto`` and the
stubs import as ``from protos import grpc_predict_v2_pb2``. For every proto file this writes
``<name>_pb2.py``, ``<name>_pb2.pyi`` and ``<name>_pb2_grpc.py`` into ``DIR/protos/``;
``DIR`` defaults to the repository root, so a plain run refreshes the checked-in stubs.

The stubs are checked in and never edited by hand; ``tests/unit/test_protos.py`` regenerates
them into a temporary directory and fails if they differ from the checked-in copies.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

PROTO_PACKAGE = "protos"
REPO_ROOT = Path(__file__).resolve().parent.parent


class CodegenError(RuntimeError):
    """protoc rejected a proto file or could not write its output."""


def proto_files(repo_root: Path) -> list[Path]:
    """Every ``.proto`` file in ``<repo_root>/protos``, sorted by name."""
    found = sorted((repo_root / PROTO_PACKAGE).glob("*.proto"))
    if not found:
        raise ValueError(f"no .proto files found in {repo_root / PROTO_PACKAGE}")
    return found


def _well_known_types_dir() -> Path:
    """Folder that grpc_tools ships with google/protobuf/*.proto, for imports of those."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


def generated_paths(out_dir: Path, proto: Path) -> list[Path]:
    """The three files that ``generate`` writes for one proto file."""
    package_dir = out_dir / PROTO_PACKAGE
    return [
        package_dir / f"{proto.stem}_pb2.py",
        package_dir / f"{proto.stem}_pb2.pyi",
        package_dir / f"{proto.stem}_pb2_grpc.py",
    ]


def generate(repo_root: Path = REPO_ROOT, out_dir: Path | None = None) -> list[Path]:
    """Run protoc on every proto in ``repo_root/protos``; return the files written.

    ``out_dir`` is the root the ``protos/`` package is written under (default: ``repo_root``).
    """
    from grpc_tools import protoc  # imported here so ``--help`` works without grpcio-tools

    repo_root = repo_root.resolve()
    out_dir = (out_dir or repo_root).resolve()
    (out_dir / PROTO_PACKAGE).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for proto in proto_files(repo_root):
        args = [
            "grpc_tools.protoc",
            f"-I{repo_root}",
            f"-I{_well_known_types_dir()}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            proto.relative_to(repo_root).as_posix(),
        ]
        # protoc resolves the relative proto path against the include path, not the cwd.
        code = protoc.main(args)
        if code != 0:
            raise CodegenError(f"protoc exited with {code} on {proto}; see its message above")
        written.extend(generated_paths(out_dir, proto))
    missing = [path for path in written if not path.is_file()]
    if missing:
        raise CodegenError(f"protoc reported success but did not write {missing}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.codegen", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="root folder to write protos/*_pb2*.py under (default: the repository root)",
    )
    args = parser.parse_args(argv)
    try:
        written = generate(REPO_ROOT, args.out)
    except (CodegenError, ValueError) as exc:
        print(f"codegen failed: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
