"""A separate virtual environment with stock ``tritonclient[grpc]``, for client-compatibility checks.

The stock Triton client needs protobuf < 7, while this project's environment runs protobuf 7, so
the client cannot share our interpreter (importing both sets of stubs in one process would also
clash: both define the ``inference`` proto package). ``ensure_triton_venv`` builds
``<repo_root>/.venv-triton`` once, with exact pins, and returns its python; ``tests/triton_check.py``
then runs under that python as a subprocess.

A marker file inside the venv holds the pinned requirements; when it matches, the call returns at
once without touching pip. Changing ``TRITON_REQUIREMENTS`` rebuilds the venv on the next call.
"""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

# Exact versions verified to install and import together (Python 3.11, Linux x86_64).
# tritonclient 2.73.0 asks for protobuf>=6.30,<7 and grpcio>=1.81.1.
TRITON_REQUIREMENTS: tuple[str, ...] = (
    "tritonclient[grpc]==2.73.0",
    "protobuf==6.33.6",
    "grpcio==1.85.1",
    "numpy==2.4.6",
)
VENV_DIRNAME = ".venv-triton"
MARKER_NAME = "moe-serve-requirements.txt"
_INSTALL_TIMEOUT_S = 900
_VERIFY_IMPORT = "import numpy, google.protobuf, grpc, tritonclient.grpc"


def venv_python(venv_dir: Path) -> Path:
    """Path of the python executable inside ``venv_dir`` (POSIX layout; Ray needs Linux/macOS)."""
    return venv_dir / "bin" / "python"


def _lock_path(venv_dir: Path) -> Path:
    # Outside the repo (nothing untracked appears) and outside the venv (``venv --clear`` empties it).
    digest = hashlib.sha256(str(venv_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"moe-serve-triton-venv-{digest}.lock"


def _marker_text() -> str:
    return "\n".join(TRITON_REQUIREMENTS) + "\n"


def _is_current(venv_dir: Path) -> bool:
    marker = venv_dir / MARKER_NAME
    return (
        venv_python(venv_dir).exists()
        and marker.is_file()
        and marker.read_text(encoding="utf-8") == _marker_text()
    )


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _build(venv_dir: Path) -> None:
    # --clear also wipes a half-built venv left by an interrupted earlier attempt.
    _run([sys.executable, "-m", "venv", "--clear", str(venv_dir)], "creating the triton venv")
    python = str(venv_python(venv_dir))
    _run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *TRITON_REQUIREMENTS],
        "installing tritonclient into the triton venv",
    )
    _run([python, "-c", _VERIFY_IMPORT], "importing tritonclient in the triton venv")
    # Written last: only a venv that installed and imported cleanly counts as current.
    (venv_dir / MARKER_NAME).write_text(_marker_text(), encoding="utf-8")


def ensure_triton_venv(repo_root: Path) -> Path:
    """Return the python of ``<repo_root>/.venv-triton``, building the venv first if needed.

    Fast (no subprocess) when the venv exists and its marker matches ``TRITON_REQUIREMENTS``.
    Building needs PyPI (or a configured mirror) and takes tens of seconds. Concurrent callers
    (e.g. pytest-xdist workers) serialise on a lock file, so the venv is built once.

    Raises:
        RuntimeError: venv creation, pip install or the import check failed; the message holds
            the tail of the tool's output.
    """
    venv_dir = Path(repo_root).resolve() / VENV_DIRNAME
    if _is_current(venv_dir):
        return venv_python(venv_dir)
    with open(_lock_path(venv_dir), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _is_current(venv_dir):  # another process may have built it while we waited
                _build(venv_dir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return venv_python(venv_dir)


if __name__ == "__main__":
    print(ensure_triton_venv(Path(__file__).resolve().parent.parent))
