"""Checkpoints as safetensors (``deepsim export``): no pickle, so opening one runs no code.

A payload (the dict :func:`deepsim.train.checkpoint.save_checkpoint` writes) becomes one safetensors file:
every tensor in the file's tensor table, named by its path in the payload
(``trainer.generator.head.0.weight``), and everything else as JSON in the metadata (docs/files.md has the
layout):

    deepsim.format      "deepsim-safetensors-v1"
    deepsim.payload     the payload with each tensor replaced by {"$tensor": name}
    deepsim.config      the run's config (the same as payload["config"]; readable by any safetensors tool)
    deepsim.provenance  {"preset", "step", "commit", "task", "exported_from", ...}
    deepsim.sha256      SHA-256 over the metadata above and every tensor's name, dtype, shape and bytes
                        (integrity, not origin)

Reading is bounded by the file: the safetensors parser checks every offset against the file's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

__all__ = [
    "FORMAT",
    "is_safetensors",
    "read_safetensors",
    "read_metadata",
    "write_safetensors",
    "encode",
    "decode",
]

FORMAT = "deepsim-safetensors-v1"
_MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


def _corrupt(path, reason: str):
    from deepsim.train.checkpoint import CorruptCheckpointError

    return CorruptCheckpointError(Path(path), reason)


def is_safetensors(path: str | os.PathLike) -> bool:
    """True when ``path`` starts like a safetensors file (8-byte little-endian header size, then ``{``)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return length <= min(size - 8, _MAX_HEADER)


# ------------------------------------------------------------------------------------------------ encoding


def encode(value, path: str, tensors: dict[str, torch.Tensor]):
    """``value`` as JSON, its tensors moved into ``tensors`` under their dotted path."""
    if isinstance(value, torch.Tensor):
        name, n = path or "tensor", 1
        while name in tensors:
            name, n = f"{path}#{n}", n + 1
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"$tensor": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode(v, f"{path}.{k}" if path else k, tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"{path}: a dict key of type {type(k).__name__} cannot be stored")
            items.append([k, encode(v, f"{path}.{k}" if path else str(k), tensors)])
        return {"$items": items}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a NumPy scalar
        return value.item()
    raise TypeError(f"{path}: a {type(value).__name__} cannot be stored in a safetensors checkpoint")


def decode(value, tensors: dict[str, torch.Tensor], where: str = "payload"):
    """The inverse of :func:`encode`. Raises ValueError naming the entry on anything it did not write."""
    if isinstance(value, list):
        return [decode(v, tensors, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$tensor"}:
            name = value["$tensor"]
            if not isinstance(name, str) or name not in tensors:
                raise ValueError(f"{where}: tensor {name!r} is not in the file")
            return tensors[name]
        if set(value) == {"$tuple"} and isinstance(value["$tuple"], list):
            return tuple(decode(v, tensors, where) for v in value["$tuple"])
        if set(value) == {"$items"} and isinstance(value["$items"], list):
            out = {}
            for item in value["$items"]:
                if not (isinstance(item, list) and len(item) == 2 and not isinstance(item[0], (list, dict))):
                    raise ValueError(f"{where}: a malformed dict entry")
                out[item[0]] = decode(item[1], tensors, where)
            return out
        if any(k.startswith("$") for k in value):
            raise ValueError(f"{where}: unknown entry {sorted(value)[0]!r}")
        return {k: decode(v, tensors, where) for k, v in value.items()}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(f"{where}: unexpected {type(value).__name__}")


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for key in ("deepsim.format", "deepsim.payload", "deepsim.config", "deepsim.provenance"):
        digest.update(json.dumps([key, metadata.get(key)]).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ files


def write_safetensors(
    path: str | os.PathLike, payload: dict, *, provenance: dict | None = None, force: bool = False
) -> Path:
    """Write ``payload`` to ``path`` as safetensors (atomically: a temporary file, then a rename).

    Raises:
        FileExistsError: ``path`` exists and ``force`` is False (nothing is written).
        TypeError: the payload holds something other than tensors, numbers, strings, lists, tuples, dicts.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it (library: force=True)")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode(payload, "", tensors)
    metadata = {
        "deepsim.format": FORMAT,
        "deepsim.payload": json.dumps(skeleton),
        "deepsim.config": json.dumps(payload.get("config")),
        "deepsim.provenance": json.dumps(provenance or {}),
    }
    metadata["deepsim.sha256"] = _digest(tensors, metadata)
    data = save(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if a file appeared meanwhile: never replaces one
            tmp.unlink()
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise FileExistsError(f"{path} exists; pass --force to replace it (library: force=True)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - SafetensorError and friends: the file is damaged
        raise _corrupt(path, f"not a readable safetensors file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]


def read_safetensors(path: str | os.PathLike) -> dict:
    """The payload of a file :func:`write_safetensors` wrote (its SHA-256 checked first).

    A plain safetensors file (no ``deepsim.format`` metadata) comes back as ``{"state_dict": tensors}``.

    Raises:
        CorruptCheckpointError: damaged, or its metadata does not describe its tensors.
    """
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001
        raise _corrupt(path, f"not a readable safetensors file ({_first_line(error)})") from None
    if metadata.get("deepsim.format") != FORMAT:
        if "deepsim.format" in metadata:
            raise _corrupt(path, f"format {metadata['deepsim.format']!r}, expected {FORMAT!r}")
        return {"state_dict": tensors}
    if metadata.get("deepsim.sha256") != _digest(tensors, metadata):
        raise _corrupt(
            path, "checksum mismatch (the file's SHA-256 differs from the one recorded when written)"
        )
    try:
        skeleton = json.loads(metadata.get("deepsim.payload", ""))
        payload = decode(skeleton, tensors)
    except (ValueError, RecursionError, TypeError) as error:
        raise _corrupt(path, f"its deepsim.payload metadata is malformed ({_first_line(error)})") from None
    if not isinstance(payload, dict):
        raise _corrupt(path, "its deepsim.payload metadata is not a dict")
    return payload
