"""One expert-parallel rank process: attention + KV for its own requests, a share of every
MoE layer's expert slots, and a dispatch/combine exchange with its peers at every MoE layer.

The rank keeps no request state of its own beyond the KV cache: each step arrives from the
executor as a list of `SeqWork`, and the rank answers with the tokens it sampled. A rank with
no work still runs the step on zero tokens, because its peers need its (empty) messages at
every exchange.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from eep.dataplane.dispatch import EPDispatcher
from eep.engine.worker import ModelWorker
from eep.errors import PeerTimeout
from eep.model.loader import SlotRange, load_model
from eep.placement.routing import Placement

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RankSpec:
    """Everything a rank process needs to start (picklable)."""

    rank: int
    num_ranks: int
    model_path: str
    dtype: str
    max_num_seqs: int
    max_model_len: int
    placement: Placement
    backend: str  # "shm" | "gloo"
    rendezvous: str  # shm: segment name; gloo: init_method (file://...)
    timeout_s: float  # every data-plane wait
    poll_s: float = 1.0  # how often an idle rank checks that its parent is alive

    @property
    def slots(self) -> SlotRange:
        per_rank = self.placement.num_physical // self.num_ranks
        return SlotRange(self.rank * per_rank, per_rank)


def _exchange(spec: RankSpec):  # type: ignore[no-untyped-def]
    if spec.backend == "gloo":
        from eep.dataplane.gloo import GlooExchange

        return GlooExchange(spec.rank, spec.num_ranks, spec.rendezvous, timeout_s=spec.timeout_s)
    from eep.dataplane.shm import Endpoint, ShmExchange, ShmSegment

    endpoint = Endpoint(ShmSegment.attach(spec.rendezvous), spec.rank, timeout_s=spec.timeout_s)
    return ShmExchange(endpoint, spec.num_ranks)


def build_worker(spec: RankSpec) -> ModelWorker:
    model = load_model(
        spec.model_path, dtype=spec.dtype, max_len=spec.max_model_len, placement=spec.placement,
        slots=spec.slots, progress=False,
    )
    exchange = _exchange(spec)
    for layer in model.moe_layers():
        layer.dispatcher = EPDispatcher(
            exchange, spec.slots.count, model.cfg.hidden_size, model.cfg.top_k, model.dtype
        )
    return ModelWorker(model, spec.max_num_seqs, spec.max_model_len)


def storage_ptrs(worker: ModelWorker) -> list[int]:
    """data_ptr of every tensor that must never be reallocated: routing tables and expert slots."""
    model = worker.model
    ptrs = list(model.tables.data_ptrs())
    for layer in model.moe_layers():
        ptrs += [layer.w13.data_ptr(), layer.w2.data_ptr()]
    return ptrs


def send(conn: Connection, message: object) -> None:
    """Plain pickle: torch's multiprocessing reductions would try to share tensors by handle."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def rank_main(spec: RankSpec, conn: Connection) -> None:
    """Entry point of a rank process: serve steps from `conn` until told to stop."""
    torch.set_num_threads(1)  # N ranks share the host's cores: one thread each, no oversubscription
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{spec.rank} %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
    worker = build_worker(spec)
    send(conn, ("ready", os.getpid()))
    while True:
        if not conn.poll(spec.poll_s):
            if os.getppid() != parent:  # the executor is gone: nobody will ever send a step
                return
            continue
        kind, payload = recv(conn)
        if kind == "step":
            try:
                send(conn, ("tokens", worker.execute(payload)))
            except PeerTimeout as e:  # a silent peer: report it; the executor decides what follows
                logger.warning("step aborted: %s", e)
                send(conn, ("peer_timeout", e.peer))
        elif kind == "ptrs":
            send(conn, ("ptrs", storage_ptrs(worker)))
        elif kind == "stop":
            return


def main(argv: list[str]) -> None:
    """`python -m eep.runtime.rank FD`: FD is this rank's end of the executor's socketpair."""
    conn = Connection(int(argv[1]))
    spec = recv(conn)
    rank_main(spec, conn)


if __name__ == "__main__":
    main(sys.argv)
