"""A host's expert backup (eep.runtime.expert_backup) keeps exactly the experts it is given, in
the checkpoint's values, and its server (eep.runtime.backup_server) sends them over
ZeroMQ: bytes equal to the checkpoint's, a pair it does not keep refused, a silent
address given up within the bound. On loopback; the same path across namespace hosts, inside a
repair, is tests/test_hosts.py's."""

from __future__ import annotations

import secrets
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eep.model.checkpoint import CheckpointReader
from eep.model.config import ModelConfig
from eep.model.default_model import init_model
from eep.model.loader import load_expert
from eep.runtime.backup_server import BackupServer, BackupUnavailable, fetch_rows
from eep.runtime.expert_backup import ExpertBackup, NotBackedUp
from eep.security.curve import CurveKeys
from eep.security.secret import ClusterSecret

SECRET = ClusterSecret(secrets.token_bytes(32))
KEYS = CurveKeys.from_secret(SECRET)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("backup") / "m", "qwen3_moe")


@pytest.fixture(scope="module")
def keep(model_dir: Path) -> torch.Tensor:
    with CheckpointReader(str(model_dir)) as reader:
        cfg = ModelConfig.from_hf(reader.config)
    return torch.rand(len(cfg.moe_layers), cfg.num_experts, generator=torch.Generator().manual_seed(0)) < 0.3


@pytest.fixture
def backup(model_dir: Path, keep: torch.Tensor) -> Iterator[ExpertBackup]:
    b = ExpertBackup.build(str(model_dir), "float32", keep)
    yield b
    b.close()


def _expected(model_dir: Path, backup: ExpertBackup, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    w13, w2 = (torch.empty_like(t) for t in backup.get(*(backup.index >= 0).nonzero()[0].tolist()))
    with CheckpointReader(str(model_dir)) as reader:
        load_expert(w13, w2, reader, layer, expert)
    return w13, w2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_backup_keeps_exactly_the_experts_it_is_given_in_the_checkpoints_values(
    model_dir: Path, keep: torch.Tensor, backup: ExpertBackup
) -> None:
    assert (backup.index >= 0).equal(keep)
    every = ExpertBackup.nbytes_for(backup.cfg, backup.dtype, keep.numel())
    assert backup.file.mm.size() < 0.4 * every  # ~30% of the experts, not all
    for layer, expert in keep.nonzero().tolist()[::25]:
        w13, w2 = backup.get(layer, expert)
        e13, e2 = _expected(model_dir, backup, layer, expert)
        assert torch.equal(w13, e13) and torch.equal(w2, e2)
    layer, expert = (~keep).nonzero()[0].tolist()
    assert not backup.keeps(layer, expert)
    with pytest.raises(NotBackedUp, match=f"layer {layer} expert {expert}"):
        backup.get(layer, expert)
    again = ExpertBackup.attach(backup.name, backup.cfg, backup.dtype)  # what a rank sees: the header says what is kept
    try:
        assert again.index.equal(backup.index) and torch.equal(again.get(*keep.nonzero()[0].tolist())[1],
                                                               backup.get(*keep.nonzero()[0].tolist())[1])
    finally:
        again.close()


def test_a_fetch_gets_the_exact_rows_and_is_refused_what_is_not_kept(
    model_dir: Path, keep: torch.Tensor, backup: ExpertBackup
) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    server = BackupServer(backup, address, SECRET)
    try:
        pairs = [tuple(p) for p in keep.nonzero().tolist()[::7]]
        rows = fetch_rows(address, pairs, 5.0, KEYS, backup.row_bytes)  # type: ignore[arg-type]
        assert len(rows) == len(pairs)
        for (layer, expert), row in zip(pairs, rows):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a received frame is read-only
                flat = torch.frombuffer(row, dtype=torch.float32)
            e13, e2 = _expected(model_dir, backup, layer, expert)
            assert torch.equal(flat[: e13.numel()].view_as(e13), e13)
            assert torch.equal(flat[e13.numel() :].view_as(e2), e2)
        missing = tuple((~keep).nonzero()[0].tolist())
        with pytest.raises(BackupUnavailable, match="does not keep"):
            fetch_rows(address, [pairs[0], missing], 5.0, KEYS, backup.row_bytes)  # type: ignore[list-item]
        with pytest.raises(BackupUnavailable, match="another shape"):  # the rows are not of the size asked
            fetch_rows(address, pairs[:1], 5.0, KEYS, backup.row_bytes + 4)  # type: ignore[arg-type]
        # a stranger (another cluster's keys) gets nothing: its handshake fails, no answer comes
        stranger = CurveKeys.from_secret(ClusterSecret(secrets.token_bytes(32)))
        with pytest.raises(BackupUnavailable, match="did not answer"):
            fetch_rows(address, pairs[:1], 1.0, stranger, backup.row_bytes)  # type: ignore[arg-type]
    finally:
        server.close()


def test_a_backup_that_does_not_answer_is_given_up_within_the_bound() -> None:
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        for address in (f"tcp://127.0.0.1:{silent.getsockname()[1]}", f"tcp://127.0.0.1:{_free_port()}"):
            start = time.monotonic()
            with pytest.raises(BackupUnavailable, match="did not answer within 0.5 s"):
                fetch_rows(address, [(0, 0)], 0.5, KEYS, 4)
            assert time.monotonic() - start < 2.0
    finally:
        silent.close()
