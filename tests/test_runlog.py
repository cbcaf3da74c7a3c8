"""The loop's parts as units: the run log (metrics rows read one step late, the NaN check, rank 0 files) and
the checkpointer (keep-K, last good, provenance passed in, other ranks write nothing), and the comparator
registry's answer to "does this comparator borrow D"."""

from __future__ import annotations

import json

import pytest
import torch

from deepsim.comparators import ARCHITECTURES, uses_network
from deepsim.config import TrainConfig
from deepsim.train.checkpoint import CHECKPOINT_NAME, Checkpointer, find_checkpoints, load_checkpoint
from deepsim.train.distributed import DistributedContext
from deepsim.train.factory import build_autoencoder_trainer, needs_discriminator
from deepsim.train.runlog import NonFiniteLossError, RunLog

CPU = torch.device("cpu")


def _context(rank: int = 0, world: int = 1) -> DistributedContext:
    return DistributedContext(rank, world, rank, CPU, False)


def _config(tmp_path, **changes) -> TrainConfig:
    return TrainConfig(out=str(tmp_path), steps=10, batch_size=2, tensorboard=False).replace(**changes)


def _metrics(**values) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value) for name, value in values.items()}


class _Skipping:
    def __init__(self, skipped: int):
        self.skipped = skipped


def test_a_queued_row_is_written_at_the_next_flush_with_speed_and_skipped(tmp_path):
    log = RunLog(
        tmp_path, _config(tmp_path), start=0, world=1, is_main=True, progress=False, stream=_Skipping(3)
    )
    try:
        log.flush(last_good=None)  # nothing queued: nothing written
        log.count_step()
        log.queue(1, _metrics(**{"Loss/G/total": 2.5, "Loss/D/real": 0.5}))
        assert log.history == []  # the copy is on its way; read one step later
        log.count_step()
        log.flush(last_good=None)
    finally:
        log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == log.history and len(rows) == 1
    assert list(rows[0]) == ["step", "Loss/G/total", "Loss/D/real", "images_per_s", "Data/skipped"]
    assert rows[0]["step"] == 1 and rows[0]["Loss/G/total"] == 2.5 and rows[0]["Data/skipped"] == 3
    assert rows[0]["images_per_s"] > 0


def test_a_non_finite_metric_raises_naming_the_last_good_checkpoint_and_writes_no_row(tmp_path):
    log = RunLog(
        tmp_path, _config(tmp_path), start=4, world=1, is_main=True, progress=False, stream=_Skipping(0)
    )
    try:
        log.queue(5, _metrics(**{"Loss/G/total": float("nan"), "Loss/D/real": 0.5}))
        with pytest.raises(
            NonFiniteLossError, match=r"step 5 \(Loss/G/total = nan\).*last good checkpoint old\.pt"
        ):
            log.flush(last_good="old.pt")
        log.queue(6, _metrics(**{"Loss/G/total": float("inf")}))
        with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
            log.flush(last_good=None)
    finally:
        log.close()
    assert log.history == [] and (tmp_path / "metrics.jsonl").read_text() == ""


def test_other_ranks_check_and_keep_rows_but_write_no_files(tmp_path):
    log = RunLog(
        tmp_path,
        _config(tmp_path, tensorboard=True),
        start=0,
        world=1,
        is_main=False,
        progress=True,
        stream=_Skipping(0),
    )
    log.queue(1, _metrics(**{"Loss/G/total": 1.0}))
    log.flush(last_good=None)
    log.samples(None, torch.zeros(1), 1)  # rank 0 only: never touches the trainer here
    log.close()
    assert [row["step"] for row in log.history] == [1]
    assert list(tmp_path.iterdir()) == []


class _Stream:
    def __init__(self, cursor: int):
        self.cursor = cursor

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}


def test_the_checkpointer_keeps_k_records_its_own_provenance_and_tracks_the_last_good(tmp_path):
    config = _config(tmp_path, loss="se", steps=3)
    torch.manual_seed(0)
    trainer = build_autoencoder_trainer(config, CPU)
    mine = Checkpointer(
        tmp_path, keep=2, context=_context(), provenance={"preset": "a"}, resumed=None, say=print
    )
    other = Checkpointer(
        tmp_path / "b", keep=1, context=_context(), provenance={"preset": "b"}, resumed=None, say=print
    )
    assert mine.last_good is None
    for step in (1, 2, 3):
        assert (
            mine.write(step, config=config, trainer=trainer, stream=_Stream(step * 2))
            == tmp_path / CHECKPOINT_NAME
        )
    other.write(7, config=config, trainer=trainer, stream=_Stream(0))
    assert mine.last_good == tmp_path / CHECKPOINT_NAME
    assert [load_checkpoint(p)["step"] for p in find_checkpoints(tmp_path)] == [3, 2]
    payload = load_checkpoint(tmp_path)
    assert (
        payload["provenance"] == {"preset": "a"}
        and payload["data"] == {"cursor": 6}
        and payload["world_size"] == 1
    )
    assert load_checkpoint(tmp_path / "b")["provenance"] == {"preset": "b"}
    # a new checkpointer over the same folder starts from the newest checkpoint there (what a NaN leaves)
    again = Checkpointer(tmp_path, keep=2, context=_context(), provenance={}, resumed=None, say=print)
    assert again.last_good == tmp_path / CHECKPOINT_NAME


def test_a_rank_other_than_0_writes_nothing_and_names_rank_0s_file(tmp_path):
    config = _config(tmp_path, loss="se")
    trainer = build_autoencoder_trainer(config, CPU)
    rank1 = Checkpointer(tmp_path, keep=1, context=_context(rank=1), provenance={}, resumed=None, say=print)
    assert rank1.write(1, config=config, trainer=trainer, stream=_Stream(0)) == tmp_path / CHECKPOINT_NAME
    assert list(tmp_path.iterdir()) == [] and rank1.last_good is None


def test_the_registry_says_which_comparators_borrow_the_discriminator():
    borrowing = {arch for arch, (_, kind) in ARCHITECTURES.items() if kind == "network"}
    assert borrowing == {"discriminator"}
    assert uses_network("discriminator:conv3") and uses_network("discriminator:conv1=1,conv5=0.5")
    assert not any(uses_network(f"{arch}:conv3") for arch in set(ARCHITECTURES) - borrowing)
    assert not uses_network("nosuch:conv3")
    no_adv = TrainConfig(lambda_adv=0.0)
    assert needs_discriminator(no_adv.replace(comparator="discriminator:conv3"))
    assert not needs_discriminator(no_adv)
    assert needs_discriminator(TrainConfig(lambda_adv=1.0)) and not needs_discriminator(
        TrainConfig(loss="se")
    )
