"""Checkpoints: written atomically, checksummed, and the last K kept.

Writing (:func:`save_checkpoint`). The payload goes to a temporary file in the same folder, then fsync, then
``os.replace`` onto the checkpoint's name (and an fsync of the folder). A process killed while writing, or a
write that fails (a full disk), leaves the previous checkpoint untouched and loadable: the failure raises
:class:`CheckpointWriteError`, whose message says so; a half-written temporary file is never read (it has
another name) and is removed by the next successful save. With ``keep=K`` the checkpoint being replaced is
first renamed ``<stem>.step<NNNNNNN><suffix>`` (``checkpoint.step0000500.pt``), and only the K-1 newest of
those are kept: ``checkpoint.pt`` is always the newest, the older ones sit beside it.

File format. Exactly what ``torch.save`` writes (a zip archive: ``torch.load`` reads it as any checkpoint),
with the checksum in the archive's comment, the last 56 bytes of the file::

    bytes 0-15   b"DEEPSIM-CKPT-V2\\n"    magic
    bytes 16-23  int64 little-endian     the payload's "step" (-1 if it has none)
    bytes 24-55  SHA-256 of every byte of the file before the zip comment-length field

Reading (:func:`load_checkpoint`) checks the SHA-256 before unpickling anything: a truncated file or flipped
bytes raise :class:`CorruptCheckpointError` naming the file. A file without the checksum (a plain
``torch.save`` file, as written before checksums existed) is loaded with a :class:`CheckpointWarning`.
Every file is unpickled with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and
dicts (and, for checkpoints written before the NumPy RNG state was stored as a tensor, NumPy arrays). A file
whose pickle needs anything else is refused with :class:`UnsafeCheckpointError` unless the caller trusts it
(``trust=True``, :func:`trust_checkpoints`, CLI ``--trust-checkpoint``). The checksum proves integrity (the
file is what was written), not origin: anyone can write a file with a valid checksum. A ``.safetensors``
file written by ``deepsim export`` (:mod:`deepsim.train.tensorfile`) is read without any pickle.
Given a folder, :func:`load_checkpoint` takes the newest checkpoint that passes the check and warns, naming
both files, when it had to fall back past a corrupt one (:func:`load_latest` does the same and returns what
it skipped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import pickle
import random
import re
import struct
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deepsim.config import TrainConfig
from deepsim.train import distributed

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy < 2
    from numpy.core.multiarray import _reconstruct
from deepsim.train.tensorfile import is_safetensors, read_safetensors

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_latest",
    "find_checkpoints",
    "read_footer",
    "quarantine",
    "fallback_message",
    "rng_state",
    "set_rng_state",
    "CheckpointError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "CheckpointWarning",
    "CheckpointFooter",
    "UnsafeCheckpointError",
    "trust_checkpoints",
    "safe_torch_load",
    "CHECKPOINT_NAME",
    "Checkpointer",
    "select_resume",
    "refuse_existing_run",
    "resumable_config",
]

CHECKPOINT_NAME = "checkpoint.pt"
_MAGIC = b"DEEPSIM-CKPT-V2\n"
_FOOTER = struct.Struct("<16sq32s")  # magic, step, sha256 -> 56 bytes: the zip comment
_EOCD = struct.Struct("<4s16xH")  # the zip end-of-central-directory record: signature ... comment length
_EOCD_SIGNATURE = b"PK\x05\x06"
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the run."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is damaged (truncated, flipped bytes, not a checkpoint at all)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"checkpoint {path} is corrupt: {reason}")


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (e.g. the disk is full); the previous checkpoint is untouched."""


class UnsafeCheckpointError(CheckpointError):
    """A file's pickle needs more than tensors and plain containers (it could run code): refused."""

    def __init__(self, path: Path, needs: list[str]):
        self.path, self.needs = Path(path), needs
        what = (
            ", ".join(needs[:4]) + (", ..." if len(needs) > 4 else "")
            if needs
            else "objects other than tensors"
        )
        super().__init__(
            f"{path} was not opened: its pickle needs {what}, which could run code when unpickled; open it "
            "only if you trust where it came from, with --trust-checkpoint (library: trust=True)"
        )


class CheckpointWarning(UserWarning):
    """A checkpoint was loaded without its checksum, or in place of a corrupt newer one."""


@dataclasses.dataclass(frozen=True)
class CheckpointFooter:
    step: int  # the payload's step (-1: none)
    checked_bytes: int  # the bytes the checksum covers (the file up to the zip comment-length field)
    sha256: str  # their hex digest


def rng_state() -> dict:
    """Every RNG a run draws from: Python, NumPy, torch CPU and (when present) CUDA, as tensors, numbers,
    strings and tuples only (what ``torch.load(weights_only=True)`` reads)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (
        str(kind),
        torch.from_numpy(keys.astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    )
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (also its older form with a NumPy array, and lists in place of tuples)."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ names


def _step_name(path: Path, step: int) -> Path:
    return path.with_name(f"{path.stem}.step{step:07d}{path.suffix}")


def _step_files(path: Path) -> list[tuple[int, Path]]:
    """The kept older checkpoints of ``path`` as (step, file), newest first."""
    pattern = re.compile(rf"^{re.escape(path.stem)}\.step(\d+){re.escape(path.suffix)}$")
    found = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            match = pattern.match(candidate.name)
            if match and candidate.is_file():
                found.append((int(match.group(1)), candidate))
    return sorted(found, key=lambda item: item[0], reverse=True)


def find_checkpoints(folder: str | os.PathLike, name: str = CHECKPOINT_NAME) -> list[Path]:
    """The checkpoints in ``folder``, newest first: ``name`` (the newest by construction), then the kept
    older ones (``<stem>.step<N><suffix>``) by decreasing step."""
    path = Path(folder) / name
    return ([path] if path.is_file() else []) + [p for _, p in _step_files(path)]


# ------------------------------------------------------------------------------------------------ writing


class _HashingWriter:
    """A write-only file object that hashes what torch.save writes through it, except the last 2 bytes (the
    zip comment length, rewritten afterwards). It keeps the first OSError a write raised: torch.save's zip
    writer then fails again while closing the archive and raises a RuntimeError of its own, which would
    otherwise hide that the disk was full."""

    def __init__(self, handle):
        self.handle, self.hash, self.size = handle, hashlib.sha256(), 0
        self.held = b""  # the last 2 bytes so far, not hashed yet
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            written = self.handle.write(view)
        except OSError as error:
            self.error = self.error or error
            raise
        if len(view) >= 2:
            self.hash.update(self.held)
            self.hash.update(view[:-2])
            self.held = bytes(view[-2:])
        else:
            joined = self.held + bytes(view)
            self.hash.update(joined[:-2])
            self.held = joined[-2:]
        self.size += len(view)
        return written

    def flush(self) -> None:
        self.handle.flush()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every filesystem syncs a directory
        pass
    finally:
        os.close(fd)


def _previous_state(path: Path) -> str:
    if not path.is_file():
        return "no earlier checkpoint exists there"
    footer = read_footer(path)
    step = f" (step {footer.step})" if footer is not None and footer.step >= 0 else ""
    return f"the previous checkpoint {path}{step} is intact"


def _write_error(path: Path, error: OSError) -> CheckpointWriteError:
    code = errno.errorcode.get(error.errno, "") if error.errno else ""
    what = f"{error.strerror or error}" + (f" ({code})" if code else "")
    hint = (
        " Free some space (or choose another --out) and resume."
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        else ""
    )
    return CheckpointWriteError(f"could not write checkpoint {path}: {what}; {_previous_state(path)}.{hint}")


def _step_of(path: Path) -> int | None:
    """The step of an existing checkpoint (its footer, or a legacy file's payload); None if unreadable."""
    footer = read_footer(path)
    if footer is not None:
        return footer.step if footer.step >= 0 else None
    try:
        return int(safe_torch_load(path, trust=False, mmap=True)["step"])
    except Exception:  # noqa: BLE001 - an unreadable (or unsafe) legacy file is simply replaced
        return None


def _write_with_checksum(writer: _HashingWriter, payload: dict, step: int, tmp: Path) -> None:
    """torch.save ``payload`` through ``writer``, then write the checksum footer as the zip comment and
    fsync."""
    handle = writer.handle
    torch.save(payload, writer)
    handle.seek(-_EOCD.size, os.SEEK_END)
    signature, comment_length = _EOCD.unpack(handle.read(_EOCD.size))
    if signature != _EOCD_SIGNATURE or comment_length != 0:
        raise CheckpointError(f"torch.save wrote no zip end record to {tmp}: cannot add the checksum")
    handle.seek(-2, os.SEEK_END)
    handle.write(struct.pack("<H", _FOOTER.size) + _FOOTER.pack(_MAGIC, step, writer.hash.digest()))
    handle.flush()
    os.fsync(handle.fileno())


def save_checkpoint(
    path: str | os.PathLike, payload: dict, *, keep: int | None = None, replaced_step: int | None = None
) -> Path:
    """Write ``payload`` to ``path`` atomically, with a checksum.

    Args:
        path: the checkpoint file (``<out>/checkpoint.pt`` in a run).
        payload: a dict (``torch.save``-able); its ``"step"``, if any, is recorded beside the checksum.
        keep: None (default): replace ``path`` and touch nothing else. K >= 1: keep the K newest checkpoints:
            the one being replaced is renamed ``<stem>.step<N><suffix>`` first, and the older renamed ones
            beyond K-1 are deleted.
        replaced_step: the step of the checkpoint now at ``path``, when the caller knows it (a run resumed
            from that file), so a file without a checksum record is not read a second time to learn it.

    Returns:
        ``path``.

    Raises:
        CheckpointWriteError: the write failed (full disk, quota, I/O error); the message names the file
            and says that the previous checkpoint is intact.
    """
    path = Path(path)
    if keep is not None and keep < 1:
        raise ValueError(f"keep={keep}: expected at least 1 checkpoint to keep (--keep-checkpoints)")
    step = payload.get("step") if isinstance(payload, dict) else None
    step = int(step) if isinstance(step, (int, np.integer)) else -1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from error
    tmp = Path(tmp_name)
    writer = None
    try:
        with os.fdopen(fd, "w+b") as handle:
            writer = _HashingWriter(handle)
            _write_with_checksum(writer, payload, step, tmp)
        if keep is not None and keep > 1 and path.is_file():
            old_step = replaced_step if replaced_step is not None else _step_of(path)
            if old_step is not None and old_step != step:
                os.replace(path, _step_name(path, old_step))
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        os_error = writer.error if writer is not None and writer.error is not None else error
        if isinstance(os_error, OSError):
            raise _write_error(path, os_error) from error
        raise
    _fsync_folder(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    if keep is not None:
        for _, old in _step_files(path)[keep - 1 :]:
            try:
                old.unlink()
            except OSError as error:
                warnings.warn(
                    f"could not delete old checkpoint {old}: {error}", CheckpointWarning, stacklevel=2
                )
    return path


# ------------------------------------------------------------------------------------------------ reading


def read_footer(path: str | os.PathLike) -> CheckpointFooter | None:
    """The checksum record of a checkpoint (nothing is unpickled); None for a file without one."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        tail_size = _EOCD.size + _FOOTER.size
        if size < tail_size:
            return None
        handle.seek(size - tail_size)
        tail = handle.read(tail_size)
    signature, comment_length = _EOCD.unpack(tail[: _EOCD.size])
    magic, step, digest = _FOOTER.unpack(tail[_EOCD.size :])
    if signature != _EOCD_SIGNATURE or comment_length != _FOOTER.size or magic != _MAGIC:
        return None
    return CheckpointFooter(step=step, checked_bytes=size - _FOOTER.size - 2, sha256=digest.hex())


_TRUSTED = [False]  # set by trust_checkpoints(); a list, so the context manager can restore it


@contextlib.contextmanager
def trust_checkpoints(trust: bool = True):
    """Within the block, files that need a full unpickle are opened (``--trust-checkpoint``): their pickle can
    run any code, so only for files whose origin you trust. Safe files are read the same way either way."""
    before = _TRUSTED[0]
    _TRUSTED[0] = bool(trust)
    try:
        yield
    finally:
        _TRUSTED[0] = before


def _legacy_globals() -> list:
    """What checkpoints written before :func:`rng_state` stored tensors need beyond weights_only's defaults:
    the NumPy RNG state's uint32 array (rebuilt from its raw bytes; no code of the file runs)."""
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a torch.save file's pickle names beyond what :func:`safe_torch_load` allows (read without
    unpickling)."""
    allowed = {f"{g.__module__}.{g.__name__}" for g in _legacy_globals()}
    allowed |= {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
    try:
        return [
            name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed
        ]
    except Exception:  # noqa: BLE001 - not a readable zip/pickle: the caller reports it as corrupt
        return []


def safe_torch_load(path, map_location="cpu", *, trust: bool | None = None, mmap: bool = False):
    """``torch.load`` that runs no code of the file: ``weights_only=True`` (plus the NumPy array of older
    checkpoints' RNG state).

    Args:
        trust: open a file that needs more with a full unpickle (it can run code); None: as
            :func:`trust_checkpoints` says (default: no).

    Raises:
        UnsafeCheckpointError: the file needs more, and it is not trusted (nothing of it ran).
        CorruptCheckpointError: it cannot be read at all.
    """
    path = Path(path)
    trust = _TRUSTED[0] if trust is None else trust
    if mmap:  # torch maps zip archives only (the legacy torch.save format is read in full)
        with open(path, "rb") as handle:
            mmap = handle.read(4) == b"PK\x03\x04"
    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        needs = _unsafe_globals(path)
        if not trust and needs:
            raise UnsafeCheckpointError(path, needs) from None
        if not trust:  # no global to blame: a damaged pickle, or opcodes a weights-only pickle never has
            raise CorruptCheckpointError(
                path, f"its pickle cannot be read safely ({_unpickler_reason(error)})"
            ) from None
    except Exception as error:  # noqa: BLE001 - any other failure to read means the same thing to the user
        raise CorruptCheckpointError(
            path, f"it cannot be read ({type(error).__name__}: {_first_line(error)})"
        ) from None
    warnings.warn(
        f"{path}: fully unpickled (--trust-checkpoint): any code its pickle holds has run",
        CheckpointWarning,
        stacklevel=2,
    )
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise CorruptCheckpointError(
            path, f"it cannot be read ({type(error).__name__}: {_first_line(error)})"
        ) from None


def _unpickler_reason(error: BaseException) -> str:
    """The line of torch's weights-only error that says what it met (its message is many lines of advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if "WeightsUnpickler error" in line or "Unsupported" in line]
    return (said[0] if said else lines[-1] if lines else type(error).__name__)[:300]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _unpickle(path: Path, map_location):
    return safe_torch_load(path, map_location)


def _plain_zip_end(path: Path) -> bool:
    """True when ``path`` ends like a plain torch.save file (a zip end record with no comment)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < _EOCD.size:
            return False
        handle.seek(size - _EOCD.size)
        signature, comment_length = _EOCD.unpack(handle.read(_EOCD.size))
    return signature == _EOCD_SIGNATURE and comment_length == 0


def _read_verified(path: Path, map_location) -> dict:
    if is_safetensors(path):
        payload = read_safetensors(path)
        if "config" not in payload or "step" not in payload:
            raise CheckpointError(f"{path} is not a DeePSiM checkpoint (no 'config'/'step')")
        return payload
    footer = read_footer(path)
    if footer is None:
        if not _plain_zip_end(path):  # not even a complete zip: cut short, or not a checkpoint at all
            raise CorruptCheckpointError(
                path, "truncated or not a checkpoint (no zip end record, no checksum)"
            )
    else:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            remaining = footer.checked_bytes
            while remaining > 0 and (chunk := handle.read(min(_CHUNK, remaining))):
                digest.update(chunk)
                remaining -= len(chunk)
        if digest.hexdigest() != footer.sha256:
            raise CorruptCheckpointError(
                path,
                "checksum mismatch (the file's SHA-256 differs from the one recorded when it was written)",
            )
    payload = _unpickle(path, map_location)
    if not isinstance(payload, dict) or "config" not in payload or "step" not in payload:
        raise CheckpointError(f"{path} is not a DeePSiM checkpoint (no 'config'/'step')")
    if footer is None:
        warnings.warn(
            f"checkpoint {path} has no checksum (written before checkpoints had one): loaded without an "
            "integrity check",
            CheckpointWarning,
            stacklevel=3,
        )
    return payload


def load_latest(
    folder: str | os.PathLike, map_location="cpu"
) -> tuple[Path, dict, list[tuple[Path, str]]] | None:
    """The newest checkpoint in ``folder`` that passes its checksum.

    Returns:
        (its path, its payload, [(corrupt newer file, why), ...] skipped on the way), or None when the folder
        holds no checkpoint at all.

    Raises:
        CorruptCheckpointError: there are checkpoints, and every one of them is corrupt (names them all).
    """
    skipped: list[tuple[Path, str]] = []
    for candidate in find_checkpoints(folder):
        try:
            return candidate, _read_verified(candidate, map_location), skipped
        except CorruptCheckpointError as error:
            skipped.append((candidate, error.reason))
    if skipped:
        raise CorruptCheckpointError(
            Path(folder),
            "every checkpoint in it is damaged: " + "; ".join(f"{p.name}: {why}" for p, why in skipped),
        )
    return None


def fallback_message(chosen: Path, payload: dict, skipped: list[tuple[Path, str]]) -> str:
    """'checkpoint A is corrupt (why); using B (step N) instead' for the files :func:`load_latest` skipped."""
    corrupt = "; ".join(f"checkpoint {p} is corrupt ({why})" for p, why in skipped)
    return f"{corrupt}; using the previous one, {chosen} (step {payload.get('step')}), instead"


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, trust: bool | None = None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (or an older one without a checksum).

    Args:
        path: a checkpoint file (read exactly, its checksum checked), or a folder: its newest checkpoint that
            passes the check (a :class:`CheckpointWarning` names the corrupt newer ones it fell back past).
        map_location: as for ``torch.load``.
        trust: True: open a file whose pickle needs more than tensors and plain containers (it can run code);
            None: as :func:`trust_checkpoints` says (default: refuse it with :class:`UnsafeCheckpointError`).

    Raises:
        CheckpointError: no checkpoint there, or not a DeePSiM checkpoint; CorruptCheckpointError: damaged;
        UnsafeCheckpointError: it needs a full unpickle and is not trusted.
    """
    if trust is not None:
        with trust_checkpoints(trust):
            return load_checkpoint(path, map_location)
    path = Path(path)
    if path.is_dir():
        found = load_latest(path, map_location)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path} (expected {CHECKPOINT_NAME})")
        chosen, payload, skipped = found
        if skipped:
            warnings.warn(fallback_message(chosen, payload, skipped), CheckpointWarning, stacklevel=2)
        return payload
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return _read_verified(path, map_location)


def quarantine(path: str | os.PathLike) -> Path:
    """Rename a corrupt checkpoint to ``<name>.corrupt`` (kept for inspection, never loaded or counted
    again)."""
    path = Path(path)
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt{n}"), n + 1
    os.replace(path, target)
    return target


# ------------------------------------------------------------------------------------------------ runs

RUN_FILES = ("config.json", "metrics.jsonl")  # what a run folder holds besides its checkpoints


def _held(out: Path) -> list[str]:
    """The names of the run files in ``out``: its checkpoints, then config.json and metrics.jsonl."""
    return [p.name for p in find_checkpoints(out)] + [n for n in RUN_FILES if (out / n).exists()]


def refuse_existing_run(out: Path, context: distributed.DistributedContext) -> None:
    """A fresh run never writes into a folder that holds a run: that run's checkpoints, metrics and config
    would be rotated, appended to and overwritten. Checked on rank 0, its answer broadcast.

    Raises:
        CheckpointError: ``out`` holds a run (names up to 3 of its files).
    """
    found = None
    if context.is_main and out.is_dir():
        held = _held(out)
        found = ", ".join(held[:3]) if held else None
    found = distributed.broadcast_object(found)
    if found:
        raise CheckpointError(
            f"--out {out} already holds a run ({found}): continue it with --resume auto, or choose a fresh "
            "--out folder; nothing in it was changed"
        )


def _refuse_mixing(out: Path, chosen: Path) -> None:
    """Resuming a checkpoint of another folder into an ``out`` that holds a run of its own would rotate and
    append to that run's files; resuming an older checkpoint of ``out`` itself would rotate away the newer
    ones."""
    if not out.is_dir():
        return
    if chosen.resolve().parent == out.resolve():
        newest = next(iter(find_checkpoints(out)), None)
        if newest is not None and newest.resolve() != chosen.resolve():
            raise CheckpointError(
                f"--resume {chosen}: {out} holds a newer checkpoint, {newest.name}, which continuing there "
                "would rotate away; resume it into a fresh --out (or --resume auto to continue the newest); "
                "nothing in it was changed"
            )
        return
    held = _held(out)
    if held:
        raise CheckpointError(
            f"--resume {chosen}: --out {out} holds another run ({', '.join(held[:3])}); resume into a fresh "
            "--out folder (or that run's own folder); nothing in it was changed"
        )


def _choose_resume(
    resume, out: Path, say: Callable[[str], None]
) -> tuple[tuple[str, str | None], dict | None]:
    """Rank 0's pick: (("path", file) | ("fresh", None), its payload if read)."""
    explicit = not isinstance(resume, bool) and resume != "auto"
    if explicit and Path(resume).is_file():
        return ("path", str(resume)), load_checkpoint(resume)
    folder = Path(resume) if explicit else out
    if explicit and not folder.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file or folder")
    found = load_latest(folder) if folder.is_dir() else None
    if found is None:
        if resume != "auto":
            raise CheckpointError(
                f"--resume: no checkpoint in {folder}; use --resume auto to start fresh when there is none"
            )
        say(f"no checkpoint in {folder}: starting fresh (--resume auto)")
        return ("fresh", None), None
    path, payload, skipped = found
    if skipped:
        say("warning: " + fallback_message(path, payload, skipped))
        for bad, _ in skipped:
            say(f"renamed the corrupt {bad.name} to {quarantine(bad).name}")
    return ("path", str(path)), payload


def select_resume(
    resume, out: Path, context: distributed.DistributedContext, *, say: Callable[[str], None]
) -> dict | None:
    """The checkpoint payload a run resumes from (None: start fresh), the same file on every rank.

    Args:
        resume: ``"auto"`` (the newest valid checkpoint in ``out``, or fresh), True (the newest in ``out``, an
            error without one), or a path (that file, or the newest valid one in that folder).
        out: the run's ``--out`` folder.
        say: prints one line (rank 0): the fallback past corrupt files (renamed ``*.corrupt``), a fresh start.

    Rank 0 picks the file and broadcasts its path, so every rank loads the same checkpoint even if another
    file appears meanwhile. The payload's ``"_source"`` names the file (for errors; never written back).

    Raises:
        CheckpointError: no checkpoint where one is needed, every one is corrupt, or resuming into ``out``
        would
            rotate away another run's files or newer checkpoints.
    """
    payload, choice = None, ("fresh", None)
    if context.is_main:
        try:
            choice, payload = _choose_resume(resume, out, say)
            if choice[0] == "path":
                _refuse_mixing(out, Path(choice[1]))
        except CheckpointError as error:
            choice = ("error", str(error))
    choice = distributed.broadcast_object(choice)
    if choice[0] == "error":
        raise CheckpointError(choice[1])
    if choice[0] == "fresh":
        return None
    if payload is None:  # another rank: the file rank 0 chose
        payload = load_checkpoint(choice[1])
    payload["_source"] = choice[1]  # names the file in errors; never written back
    return payload


def resumable_config(payload: dict, source) -> TrainConfig:
    """The saved config of a payload that holds what resuming needs (one line naming the file otherwise)."""
    source = payload.get("_source", source)
    missing = [k for k in ("trainer", "rng") if not isinstance(payload.get(k), dict)]
    if not missing:
        missing = [f"trainer.{k}" for k in ("generator", "opt_g") if k not in payload["trainer"]]
    if missing:
        raise CheckpointError(
            f"checkpoint {source} cannot be resumed: it has no {', '.join(repr(m) for m in missing)} "
            "(training state); an imported or exported generator trains no further (deepsim export "
            "--training-state keeps it)"
        )
    try:
        return TrainConfig.from_dict(payload["config"])
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {source}: its config cannot be read ({error})") from None


class Checkpointer:
    """The checkpoints of one run: ``out/checkpoint.pt`` written by rank 0 (atomic, checksummed), the newest
    ``keep`` kept, and the last good one remembered (what a NaN or a stop signal names).

    Args:
        out: the run folder.
        keep: how many checkpoints to keep (>= 1).
        context: the ranks; every rank calls :meth:`write` (the replica fingerprints are a collective).
        provenance: recorded under ``"provenance"`` in every checkpoint (preset, commit).
        resumed: the payload the run resumed from (None: fresh): the file it came from is replaced without a
            second read to learn its step.
        say: prints one line (a warning that the ranks' parameters differ).
    """

    def __init__(
        self,
        out: Path,
        *,
        keep: int,
        context: distributed.DistributedContext,
        provenance: dict,
        resumed: dict | None,
        say: Callable[[str], None],
    ):
        self.path, self.keep, self.context = out / CHECKPOINT_NAME, keep, context
        self.provenance, self.say = provenance, say
        self.last_good = next(
            iter(find_checkpoints(out)), None
        )  # the newest one already there (what a NaN leaves)
        # the file resumed from and its step: replacing it needs no second read of it
        self._resumed = None
        if resumed and "_source" in resumed:
            self._resumed = (Path(resumed["_source"]).resolve(), int(resumed["step"]))

    def write(self, step: int, *, config: TrainConfig, trainer, stream) -> Path:
        """Checkpoint ``step``; returns the checkpoint's path (on other ranks: the one rank 0 writes).

        Raises:
            CheckpointWriteError: the write failed; the previous checkpoint is intact.
        """
        world = self.context.world
        replicas = distributed.replica_fingerprints(trainer) if world > 1 else None  # every rank takes part
        if not self.context.is_main:
            return self.path  # rank 0 writes it
        payload = {
            "step": step,
            "config": config.to_dict(),
            "trainer": trainer.training_state(),
            "rng": rng_state(),
            "data": stream.state_dict(),  # the global sample cursor: resume at any world size
            "world_size": world,
            "provenance": dict(self.provenance),
        }
        if replicas is not None:
            payload["replicas"] = replicas
            if len(set(replicas)) > 1:
                self.say(
                    f"warning: the ranks' parameters differ at step {step} (fingerprints per rank: "
                    f"{replicas})"
                )
        resumed, self._resumed = self._resumed, None
        replaced = resumed[1] if resumed and resumed[0] == self.path.resolve() else None
        self.last_good = save_checkpoint(self.path, payload, keep=self.keep, replaced_step=replaced)
        return self.last_good
