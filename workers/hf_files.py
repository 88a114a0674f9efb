"""Which file of a Hugging Face checkpoint directory holds which tensor: the safetensors index
(`model.safetensors.index.json`) or, without one, the files' own headers; and the small readers
the checkpoint code shares (JSON files, a tensor's dtype from its file's header). Reads no tensor
data."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from workers.weights import CheckpointError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def header_dtype(path: Path, key: str) -> str:
    """The safetensors dtype name (e.g. "BF16", "F8_E4M3") of `key`, from the file's header."""
    try:
        return open_file(path, f"tensor {key!r}").get_slice(key).get_dtype()
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: cannot read tensor {key!r}: {exc}") from exc


def open_file(path: Path, needed_for: str, opener: Callable[..., Any] = safe_open) -> Any:
    """Open a safetensors file for lazy reads; CheckpointError naming the file and what needs it."""
    try:
        return opener(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing; needed for {needed_for}") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); needed for {needed_for}"
        ) from exc


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: malformed JSON: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def key_files(root: Path, required: list[str], optional: Sequence[str] = ()) -> dict[str, str]:
    """Map every required key (and each optional one the checkpoint has) to the file (name
    inside `root`) that holds it."""
    index = root / INDEX_FILE
    wanted = set(required) | set(optional)
    if index.is_file():
        files, where = _files_from_index(index, wanted), str(index)
    else:
        files, where = _files_from_headers(root, wanted)
    missing = [key for key in required if key not in files]
    if missing:
        more = f" (and {len(missing) - 1} more MoE tensors)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]!r} not found{more}")
    if index.is_file():
        for key, name in files.items():
            if not (root / name).is_file():
                raise CheckpointError(
                    f"{root / name}: shard file is missing; {INDEX_FILE} maps {key!r} to it"
                )
    return files


def all_key_files(root: Path) -> dict[str, str]:
    """Every tensor key of the checkpoint -> the file (name inside `root`) that holds it."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = load_json(index).get("weight_map")
        return {k: v for k, v in weight_map.items() if isinstance(v, str)} if isinstance(weight_map, dict) else {}
    single = root / SINGLE_FILE
    paths = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
    return {key: path.name for path in paths for key in open_file(path, "listing its tensors").keys()}


def _files_from_index(index: Path, required: set[str]) -> dict[str, str]:
    weight_map = load_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: key 'weight_map' must be an object, got {weight_map!r}")
    files = {}
    for key, name in weight_map.items():
        if key in required:
            if not isinstance(name, str):
                raise CheckpointError(
                    f"{index}: 'weight_map' entry {key!r} is {name!r}, not a file name"
                )
            files[key] = name
    return files


def _files_from_headers(root: Path, required: set[str]) -> tuple[dict[str, str], str]:
    """No index: read the key list of model.safetensors, or of every *.safetensors."""
    single = root / SINGLE_FILE
    paths = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(
            f"{root}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors files"
        )
    files: dict[str, str] = {}
    for path in paths:
        for key in open_file(path, "listing its tensors").keys():
            if key not in required:
                continue
            if key in files:
                raise CheckpointError(f"{path}: tensor {key!r} is also in {root / files[key]}")
            files[key] = path.name
    return files, ", ".join(str(p) for p in paths)
