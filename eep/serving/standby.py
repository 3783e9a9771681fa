"""`eep serve --standby`: a standby head beside a running instance.

It follows the head's journal of requests (`eep.serving.replication`: a snapshot, then every
change, over the controller's door, authenticated with the cluster secret) and answers HTTP
truthfully as what it is: `/health` is 503 `{"status": "standby"}` (a load balancer sends
nothing here), every `/v1/...` request is 503 naming the head, and `/membership` says what it
follows (`role`, `head`, `journal`: requests, those the head runs, tokens, connections).

With etcd (`--etcd-endpoints`, the instance's), it watches the head's leader key; once the
key it saw is gone (the head's lease lapsed: the head is lost, or cut off and deposed by its own
clock), it takes over (`take_over`): it takes the key, listens for the agents at its own
address (the port of `--dist-init-addr`), adopts the running ranks and repairs coverage
(`eep.control.takeover`), admits again every request the head was running from its committed
tokens, and serves the full API on the same HTTP address: `/health` turns 200, a client's
`Last-Event-ID` or `X-Request-Id` finds its request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
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
    serve: Any = None  # the head's ServeConfig (the same flags): what it takes over with (None: never)

    def __post_init__(self) -> None:
        if self.node < 1:
            raise ConfigError("--standby needs --node-rank >= 1 (the head is node 0)")
        host, _, port = self.http.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--standby needs --http HOST:PORT (its health and status), got {self.http!r}")


def tokens_digest(tokens: dict[str, list[int]]) -> str:
    """What a set of requests committed, as one comparable string: request id -> token ids."""
    return hashlib.sha256(json.dumps(sorted(tokens.items())).encode()).hexdigest()


class _Switch:
    """The ASGI app that the HTTP server runs: the standby's, then, once it leads, the full one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class Standby:
    """The replica of the head's journal, the link that feeds it, and the take-over."""

    def __init__(self, config: StandbyConfig) -> None:
        self.config = config
        self.replica = JournalReplica(RequestJournal())
        self.link = StandbyLink(config.head, config.node, ClusterSecret.load(config.secret_file), self.replica,
                                silent_s=config.silent_s)
        self.switch: _Switch | None = None
        self.loop: Any = None  # the EngineLoop once it leads
        self.state = "standby"  # "standby" | "taking over" | "leading" | "failed"
        self.took_over_at: float | None = None
        self._stop = threading.Event()
        self._store: Any = None
        ep = config.serve.ep if config.serve is not None else None
        if ep is not None and ep.etcd_endpoints:
            from eep.membership.store import EtcdStore

            secret = ClusterSecret.load(config.secret_file)
            self._store = EtcdStore(list(ep.etcd_endpoints), ep.instance, timeout_s=ep.failure_timeout_s,
                                    credentials=secret.etcd_credentials(ep.instance))
        self._watcher = threading.Thread(target=self._watch, name="eep-standby-watch", daemon=True)

    def start(self, switch: _Switch) -> None:
        self.switch = switch
        if self._store is not None:
            self._watcher.start()

    def _watch(self) -> None:
        """Until the head's leader key is gone; then take over (another standby may win the key:
        then stand by again)."""
        from eep.membership.store import NotLeader, StoreError

        seen = False  # a key that was never there is a head still starting, not a head lost
        while not self._stop.wait(0.1):
            try:
                if self._store.leader() is not None:
                    seen = True
                    continue
            except StoreError as e:
                logger.warning("standby: etcd: %s", e)
                continue
            if not seen:
                continue
            try:
                self.take_over()
                return
            except NotLeader as e:
                logger.info("standby: another head took the key first (%s); standing by", e)
                self.state = "standby"
            except Exception:  # the take-over failed: this standby cannot lead; it says so
                logger.exception("standby: the take-over failed")
                self.state = "failed"
                return

    def take_over(self) -> None:
        from eep.control.config import Takeover
        from eep.control.executor import EPExecutor
        from eep.engine.engine import LLMEngine
        from eep.engine.loop import EngineLoop
        from eep.serving.http import create_app

        serve = self.config.serve
        assert serve is not None and self.switch is not None
        self.state = "taking over"
        started = time.monotonic()
        port = self.config.head.rpartition(":")[2]
        host = self.link.address or self.config.http.rpartition(":")[0]
        logger.warning("standby: the head's leader key is gone; taking over at %s:%s", host, port)
        executor = EPExecutor(serve.engine, serve.ep, takeover=Takeover(self.config.node, f"{host}:{port}"))
        try:
            self.link.close()
            engine = LLMEngine(serve.engine, executor)
            self.loop = EngineLoop(engine)
        except BaseException:
            executor.close()
            raise
        name = serve.served_model_name or Path(serve.engine.model_path).name
        self.switch.app = create_app(self.loop, model_name=name, api_key=self.config.api_key,
                                     admin_api_key=self.config.admin_api_key, journal=self.replica.journal)
        running = self.replica.running()
        for entry in running:
            entry.submit(self.loop, resume=True)
        self.state, self.took_over_at = "leading", time.time()
        logger.warning("standby: leading; %d requests admitted again from their committed tokens (%.2f s)",
                       len(running), time.monotonic() - started)

    def status(self) -> dict[str, Any]:
        entries = self.replica.journal.entries()
        return {"role": "standby", "state": self.state, "node": self.config.node, "head": self.config.head,
                "journal": {"connected": self.link.connected.is_set(), "connections": self.link.connections,
                            "requests": len(entries), "running": len(self.replica.running()),
                            "tokens": sum(len(c.output_ids) for e in entries for c in e.choices),
                            "digest": tokens_digest({e.rid: [t for c in e.choices for t in c.output_ids]
                                                     for e in entries}),
                            "head_epoch": self.replica.epoch,
                            "last_heard_s": (time.monotonic() - self.link.last_heard) if self.link.last_heard else None}}

    def why(self) -> str:
        if self.state != "standby":
            return f"standby head of node {self.config.node}: {self.state}"
        following = "following its journal" if self.link.connected.is_set() else "not reaching it now"
        return f"standby head of node {self.config.node}: the head is at {self.config.head} ({following})"

    def close(self) -> None:
        self._stop.set()
        self.link.close()
        if self._watcher.is_alive():
            self._watcher.join(30)
        if self.loop is not None:
            self.loop.close()
        if self._store is not None:
            self._store.close()


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
    switch = _Switch(create_standby_app(standby, api_key=config.api_key, admin_api_key=config.admin_api_key))
    server = uvicorn.Server(uvicorn.Config(switch, host=host, port=int(port), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="eep-standby-http", daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the standby's HTTP server did not start on {config.http} (is the port taken?)")
            time.sleep(0.02)
        standby.start(switch)
        bound = server.servers[0].sockets[0].getsockname()[:2]
        if on_ready is not None:
            on_ready(f"http://{bound[0]}:{bound[1]}")
        stop.wait()
        return 0
    finally:
        server.should_exit = True
        thread.join(10)
        standby.close()
