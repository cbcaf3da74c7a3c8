"""Where a run happened: machine, card, library versions, and the commit of the code that ran.

The commit comes from git where the checkout has it. A copy without .git (the GPU machine's) takes it from
``$DEEPSIM_COMMIT`` or else from ``bench/COMMIT``, a stamp that ``python -m bench --stamp-commit`` (or
``bash bench/gpu.sh --stamp``) writes on the machine that has git, before the copy is made. The stamp also
holds a fingerprint of the source files (:func:`tree_fingerprint`); where the copy's files differ from the
stamped ones (edited after stamping), the label says so instead of naming a commit that did not run.

Imports torch only inside :func:`machine_info`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

__all__ = [
    "COMMIT_STAMP",
    "commit_label",
    "git_state",
    "machine_info",
    "machine_label",
    "tree_fingerprint",
    "write_commit_stamp",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT_STAMP = REPO_ROOT / "bench" / "COMMIT"  # git-ignored; carried to the GPU machine with the copy
# The files whose contents the fingerprint covers (what a benchmark run executes).
_FINGERPRINT_DIRS = ("deepsim", "kernels", "bench", "tests")
_FINGERPRINT_SUFFIXES = (".py", ".sh")


def _git(*args: str, root: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def tree_fingerprint(root: Path = REPO_ROOT) -> str:
    """sha256 (first 16 hex digits) over the paths and contents of the .py/.sh files under deepsim/,
    kernels/, bench/ and tests/ (caches and bench/out excluded): equal on two machines when the copy runs
    the stamped code."""
    root = Path(root)
    digest = hashlib.sha256()
    files = []
    for top in _FINGERPRINT_DIRS:
        for path in (root / top).rglob("*"):
            rel = path.relative_to(root).as_posix()
            if (
                path.suffix in _FINGERPRINT_SUFFIXES
                and path.is_file()
                and "__pycache__" not in rel
                and not rel.startswith("bench/out/")
            ):
                files.append((rel, path))
    for rel, path in sorted(files):
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _git_commit(root: Path) -> dict | None:
    commit = _git("rev-parse", "--short", "HEAD", root=root)
    if commit is None:
        return None
    modified = [
        ln
        for ln in (_git("status", "--porcelain", "--untracked-files=no", root=root) or "").splitlines()
        if ln
    ]
    untracked = [
        ln for ln in (_git("status", "--porcelain", root=root) or "").splitlines() if ln.startswith("??")
    ]
    return {
        "commit": commit,
        "dirty": bool(modified or untracked),
        "modified": len(modified),
        "untracked": len(untracked),
        "commit_source": "git",
    }


def write_commit_stamp(path: Path = COMMIT_STAMP, root: Path = REPO_ROOT) -> dict:
    """Write ``bench/COMMIT`` (JSON: commit, dirty counts, fingerprint, date) from git; returns it.

    Raises RuntimeError where ``root`` is not a git checkout (a stamp is made where git is)."""
    state = _git_commit(Path(root))
    if state is None:
        raise RuntimeError(f"{root} is not a git checkout (or git is missing): cannot stamp the commit")
    state.pop("commit_source")
    state["fingerprint"] = tree_fingerprint(root)
    state["stamped"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    Path(path).write_text(json.dumps(state) + "\n")
    return state


def _read_stamp(path: Path, root: Path) -> dict | None:
    try:
        stamp = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or "commit" not in stamp:
        return None
    state = {k: stamp.get(k) for k in ("commit", "dirty", "modified", "untracked")}
    matches = stamp.get("fingerprint") == tree_fingerprint(root)
    state["commit_source"] = f"bench/COMMIT stamped {stamp.get('stamped')}" + (
        "" if matches else "; the files here differ from the stamped ones (edited after stamping)"
    )
    state["stamp_matches_tree"] = matches
    return state


def git_state(root: Path = REPO_ROOT, stamp: Path | None = None) -> dict:
    """commit (short hash), dirty flag and counts, and commit_source: git where it works, else
    $DEEPSIM_COMMIT, else the bench/COMMIT stamp, else "unknown"."""
    root = Path(root)
    state = _git_commit(root)
    if state is not None:
        return state
    if os.environ.get("DEEPSIM_COMMIT"):
        return {
            "commit": os.environ["DEEPSIM_COMMIT"],
            "dirty": None,
            "modified": None,
            "untracked": None,
            "commit_source": "DEEPSIM_COMMIT",
        }
    state = _read_stamp(stamp if stamp is not None else root / "bench" / "COMMIT", root)
    if state is not None:
        return state
    return {"commit": "unknown", "dirty": None, "modified": None, "untracked": None, "commit_source": "none"}


def commit_label(meta: dict) -> str:
    """'8dbc7e8', '8dbc7e8 + uncommitted changes (2 modified, 5 untracked paths)', '8dbc7e8 (no git
    metadata)', with a warning where a stamp does not match the files that ran, or 'unknown'."""
    commit, dirty = meta.get("commit", "unknown"), meta.get("dirty")
    if dirty:
        label = (
            f"{commit} + uncommitted changes ({meta.get('modified')} modified, "
            f"{meta.get('untracked')} untracked paths)"
        )
    else:
        label = commit if dirty is not None else f"{commit} (no git metadata)"
    if meta.get("stamp_matches_tree") is False:
        label += " [NOT the code that ran: files edited after bench/COMMIT was stamped]"
    return label


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _dali_version() -> str | None:
    dali = _version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali")
    if dali is not None:
        return dali
    try:  # an unpacked site folder (bench/gpu.sh) has no dist-info on the metadata path in some layouts
        # lazy, optional dependency: DALI may be absent
        import nvidia.dali as _dali

        return _dali.__version__
    except Exception:  # noqa: BLE001 - absent or broken: reported as not installed
        return None


def machine_info(device: str) -> dict:
    """Machine, card, library versions and commit, as recorded at the head of every run."""
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    try:
        # lazy, optional dependency: triton may be absent
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001 - any import failure is just reported
        triton_version = f"unavailable ({type(e).__name__})"
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "device": str(device),
        "card": torch.cuda.get_device_name(torch.device(device)) if cuda else "none (CPU run)",
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": _version("numpy"),
        "dali": _dali_version() or "not installed",
        "kernels_backend": os.environ.get("DEEPSIM_KERNELS", "auto"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    info.update(git_state())
    return info


def machine_label(meta: dict) -> str:
    """'NVIDIA H100 80GB HBM3 (host CPU: ..., 16 cores)' or '2-core CPU (AMD EPYC ...), no GPU'."""
    if meta.get("card") and not str(meta["card"]).startswith("none"):
        return f"{meta['card']} (host CPU: {meta['cpu']}, {meta['cpu_cores']} cores)"
    return f"{meta.get('cpu_cores')}-core CPU ({meta.get('cpu')}), no GPU"
