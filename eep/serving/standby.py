"""`eep serve --standby`: a standby head beside a running instance.

It follows the head's journal of requests (`eep.serving.replication`: a snapshot, then every
change, over the controller's door, authenticated with the cluster secret) and answers HTTP
truthfully as what it is: `/health` is 503 `{"status": "standby"}` (a load balancer sends
nothing here), every `/v1/...` request is 503 naming the head, and `/membership` says what it
follows (`role`, `head`, `journal`: requests, those the head runs, tokens, connections).

Taking over when the head is lost (leading from etcd, adopting the running ranks, admitting
the journal's running requests again) is not built yet: see docs/failure-handling.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from eep.errors import ConfigError, EngineUnavailable
from eep.security.secret import ClusterSecret
from eep.serving.deps import Auth, ErrorMapper
from eep.serving.journal import RequestJournal
from eep.serving.replication import JournalReplica, StandbyLink

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StandbyConfig:
    node: int  # the host it stands by on (>= 1)
    head: str  # the head's --dist-init-addr
    secret_file: str
    http: str  # HOST:PORT
    api_key: str | None = None
    admin_api_key: str | None = None
    silent_s: float = 2.0  # the head's feed silent this long: the connection is made again

    def __post_init__(self) -> None:
        if self.node < 1:
            raise ConfigError("--standby needs --node-rank >= 1 (the head is node 0)")
        host, _, port = self.http.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--standby needs --http HOST:PORT (its health and status), got {self.http!r}")


def tokens_digest(tokens: dict[str, list[int]]) -> str:
    """What a set of requests committed, as one comparable string: request id -> token ids."""
    return hashlib.sha256(json.dumps(sorted(tokens.items())).encode()).hexdigest()


class Standby:
    """The replica of the head's journal and the link that feeds it."""

    def __init__(self, config: StandbyConfig) -> None:
        self.config = config
        self.replica = JournalReplica(RequestJournal())
        self.link = StandbyLink(config.head, config.node, ClusterSecret.load(config.secret_file), self.replica,
                                silent_s=config.silent_s)

    def status(self) -> dict[str, Any]:
        entries = self.replica.journal.entries()
        return {"role": "standby", "node": self.config.node, "head": self.config.head,
                "journal": {"connected": self.link.connected.is_set(), "connections": self.link.connections,
                            "requests": len(entries), "running": len(self.replica.running()),
                            "tokens": sum(len(c.output_ids) for e in entries for c in e.choices),
                            "digest": tokens_digest({e.rid: [t for c in e.choices for t in c.output_ids]
                                                     for e in entries}),
                            "head_epoch": self.replica.epoch,
                            "last_heard_s": (time.monotonic() - self.link.last_heard) if self.link.last_heard else None}}

    def why(self) -> str:
        following = "following its journal" if self.link.connected.is_set() else "not reaching it now"
        return f"standby head of node {self.config.node}: the head is at {self.config.head} ({following})"

    def close(self) -> None:
        self.link.close()


def create_standby_app(standby: Standby, *, api_key: str | None, admin_api_key: str | None) -> FastAPI:
    auth = Auth.of(api_key, admin_api_key)
    app = FastAPI(title="eep (standby head)", version="1")
    ErrorMapper(1 << 20).install(app)
    r = APIRouter(dependencies=auth.inference)

    @r.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "standby", "reason": standby.why()}, 503)

    @r.get("/membership")
    async def membership() -> dict[str, Any]:
        return standby.status()

    @r.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def elsewhere(path: str) -> None:
        raise EngineUnavailable(f"{standby.why()}; send requests to the head")

    app.include_router(r)
    return app


def run_standby(config: StandbyConfig, stop: threading.Event,
                on_ready: Any = None) -> int:
    """Stand by until `stop` is set; 0 once everything is closed."""
    import uvicorn

    standby = Standby(config)
    host, _, port = config.http.rpartition(":")
    server = uvicorn.Server(uvicorn.Config(create_standby_app(standby, api_key=config.api_key,
                                                              admin_api_key=config.admin_api_key),
                                           host=host, port=int(port), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="eep-standby-http", daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the standby's HTTP server did not start on {config.http} (is the port taken?)")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[:2]
        if on_ready is not None:
            on_ready(f"http://{bound[0]}:{bound[1]}")
        stop.wait()
        return 0
    finally:
        server.should_exit = True
        thread.join(10)
        standby.close()
