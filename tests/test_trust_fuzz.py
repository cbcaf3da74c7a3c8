"""Property-based fuzzing of the files deepsim opens: valid checkpoints (checksummed, and plain torch.save
with no checksum, which the unpickler meets directly) and safetensors exports, with bytes flipped, the file
cut short and length fields inflated. Only deepsim's own errors come out, each example within a time bound,
and memory stays bounded. A small budget runs by default; ``-m fuzz`` runs a larger one."""

from __future__ import annotations

import re
import resource
import struct
import time

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import deepsim  # noqa: E402
from deepsim.config import TrainConfig  # noqa: E402
from deepsim.train.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint  # noqa: E402
from deepsim.train.tensorfile import write_safetensors  # noqa: E402

SECONDS_PER_FILE = 5.0
MEMORY_GROWTH_BYTES = 1 << 30  # peak RSS may grow at most this much over a whole fuzz run


def _payload() -> dict:
    torch.manual_seed(0)
    generator = {
        "enc.weight": torch.randn(8, 3, 3, 3),
        "enc.bias": torch.randn(8),
        "dec.weight": torch.randn(8, 3, 4, 4),
    }
    opt = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(8)}},
        "param_groups": [{"lr": 2e-4, "params": [0]}],
    }
    return {
        "config": TrainConfig().to_dict(),
        "step": 3,
        "trainer": {"generator": generator, "opt_g": opt},
        "rng": rng_state(),
    }


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    payload = _payload()
    save_checkpoint(root / "summed.pt", payload)
    torch.save(payload, root / "plain.pt")
    write_safetensors(
        root / "export.safetensors", payload, provenance={"preset": "x", "step": 3, "commit": None}
    )
    return {name: (root / name).read_bytes() for name in ("summed.pt", "plain.pt", "export.safetensors")}


def _length_fields(data: bytes, name: str) -> list[tuple[int, int]]:
    """(offset, width) of the length and offset fields a reader trusts: the zip records' sizes, name and
    extra lengths and offsets; the safetensors header size and the digits of its data_offsets."""
    fields = []
    if name.endswith(".safetensors"):
        fields.append((0, 8))
        header_end = 8 + struct.unpack("<Q", data[:8])[0]
        for match in re.finditer(rb"\d+", data[8:header_end]):
            fields.append((8 + match.start(), -(match.end() - match.start())))  # negative: decimal digits
        return fields
    for match in re.finditer(rb"PK\x03\x04", data):
        fields += [(match.start() + o, w) for o, w in ((18, 4), (22, 4), (26, 2), (28, 2))]
    for match in re.finditer(rb"PK\x01\x02", data):
        fields += [(match.start() + o, w) for o, w in ((20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4))]
    for match in re.finditer(rb"PK\x05\x06", data):
        fields += [(match.start() + o, w) for o, w in ((8, 2), (10, 2), (12, 4), (16, 4), (20, 2))]
    return fields


@st.composite
def mutations(draw, data: bytes, name: str):
    """A mutation as a short description (kind, details); :func:`apply` makes the bytes."""
    kind = draw(st.sampled_from(["flip", "truncate", "inflate"]))
    if kind == "flip":
        flips = draw(
            st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=8)
        )
        return kind, flips
    if kind == "truncate":
        return kind, draw(st.integers(0, len(data) - 1))
    offset, width = draw(st.sampled_from(_length_fields(data, name)))
    value = draw(st.sampled_from([-1, 0, len(data) * 2 + 1])) if width > 0 else 0
    return kind, (offset, width, value)


def apply(data: bytes, mutation) -> bytes:
    kind, details = mutation
    out = bytearray(data)
    if kind == "flip":
        for position, mask in details:
            out[position] ^= mask
    elif kind == "truncate":
        del out[details:]
    else:
        offset, width, value = details
        if width < 0:  # decimal digits in a JSON header: the same number of 9s keeps the header's size
            out[offset : offset - width] = b"9" * -width
        else:  # -1: all bits set; 0: the top bit; else a length past the end of the file
            value = (1 << (8 * width)) - 1 if value == -1 else (1 << (8 * width - 1)) if value == 0 else value
            out[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(out)


def _open_all(path, timed: bool = True) -> None:
    """Open ``path`` as every command does; only deepsim's errors may come out."""
    for opener in (load_checkpoint, deepsim.load_generator):
        started = time.perf_counter()
        try:
            opener(path)
        except CheckpointError:
            pass
        except ValueError as error:  # deepsim.load_generator builds a generator from what it read
            assert "generator" in str(error) or "expected" in str(error), repr(error)
        assert not timed or time.perf_counter() - started < SECONDS_PER_FILE, (
            f"{opener.__name__} took too long"
        )


def _fuzz(originals, tmp_path, name: str, examples: int) -> None:
    data = originals[name]
    (tmp_path / name).write_bytes(data)
    _open_all(
        tmp_path / name, timed=False
    )  # the unmutated file once: imports and first-call costs are not timed below
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(mutations(data, name))
    def check(mutation):
        path = tmp_path / name
        path.write_bytes(apply(data, mutation))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _open_all(path)

    check()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
    assert grown < MEMORY_GROWTH_BYTES, f"peak memory grew by {grown / 2**20:.0f} MiB"


FILES = ["summed.pt", "plain.pt", "export.safetensors"]


@pytest.mark.parametrize("name", FILES)
def test_mutated_files_raise_only_deepsim_errors(originals, tmp_path, name):
    _fuzz(originals, tmp_path, name, examples=30)


@pytest.mark.fuzz
@pytest.mark.parametrize("name", FILES)
def test_mutated_files_raise_only_deepsim_errors_large_budget(originals, tmp_path, name, request):
    if "fuzz" not in (request.config.getoption("-m") or ""):
        pytest.skip("the large fuzzing budget runs with -m fuzz")
    _fuzz(originals, tmp_path, name, examples=1500)


def test_the_mutations_reach_the_readers(originals):
    """The inflated fields are real length fields: each original file has them where expected."""
    for name in FILES:
        fields = _length_fields(originals[name], name)
        assert len(fields) >= (2 if name.endswith(".safetensors") else 10), name
