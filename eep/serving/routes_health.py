"""The operational endpoints of the HTTP API (`eep.serving.http`): `GET /health`, `GET /metrics`
(Prometheus text) and `GET /membership` (view, coverage, repairs and recent events of an
expert-parallel instance). They want the API key like the OpenAI endpoints, when there is one.

What they report is read on the engine loop's thread between steps, so it is one consistent
state of the engine; a loop that does not answer makes them 503 (`/health`: its own 503 body).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from eep.engine.loop import EngineLoop
from eep.errors import EngineUnavailable
from eep.serving.deps import Auth, Serving
from eep.serving.schemas import Health, Membership, errors

logger = logging.getLogger(__name__)


def router(serving: Serving, auth: Auth) -> APIRouter:
    """The routes of `/health`, `/metrics` and `/membership` for `serving`."""
    loop = serving.loop
    metrics = _Metrics(loop)
    r = APIRouter(dependencies=auth.inference)

    @r.get("/health", response_model=None, responses={
        200: {"model": Health, "description": "Serving"},
        503: {"model": Health, "description": "Not serving: admission paused (e.g. experts without a live "
                                              "replica) or the engine stopped; `reason` says why"},
        **errors(*auth.keyed)})
    async def health() -> JSONResponse:
        if not loop.healthy:
            reason = str(loop.error or "the engine loop is closed")
            return JSONResponse({"status": "unavailable", "reason": reason}, 503)
        try:
            paused = await serving.on_loop(lambda e: e.paused_reason)
        except (EngineUnavailable, TimeoutError) as e:
            return JSONResponse({"status": "unavailable", "reason": str(e) or "the engine did not answer"}, 503)
        if paused:
            return JSONResponse({"status": "paused", "reason": paused}, 503)
        return JSONResponse({"status": "ok"})

    @r.get("/membership", response_model=None, responses={200: {"model": Membership}, **errors(*auth.keyed, 503)})
    async def membership() -> dict[str, Any]:
        status = await serving.on_loop(_status)
        if status is None:
            return {"view": {"epoch": 0, "active": [0]}, "coverage": None, "events": []}
        if serving.feed is not None:  # across hosts: the standby heads that follow the journal
            status = {**status, "replication": serving.feed.status()}
        return status  # type: ignore[no-any-return]

    @r.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition format",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        **errors(*auth.keyed, 503)})
    async def prometheus() -> Response:
        snapshot = await serving.on_loop(_snapshot)
        return Response(metrics.render(snapshot, loop.queued), media_type="text/plain; version=0.0.4")

    return r


def _status(engine: Any) -> dict[str, Any] | None:
    """The executor's membership status (None: one fixed process), read on the loop thread."""
    elastic = engine.executor.elastic
    return elastic.status() if elastic is not None else None


def _snapshot(engine: Any) -> dict[str, Any]:
    """What /metrics reports, read on the loop thread between steps."""
    status = _status(engine)
    return {
        "tokens": engine.tokens_committed,
        "running": sum(len(s.running) for s in engine.schedulers),
        "waiting": sum(len(s.waiting) for s in engine.schedulers),
        "epoch": status["view"]["epoch"] if status else 0,
        "active": len(status["view"]["active"]) if status else 1,
        "repairs": status["repairs"] if status else [],
        "accounting": status.get("accounting") if status else None,
        "eplb": status.get("eplb") if status else None,
    }


class _Metrics:
    """Prometheus metrics of one server (its own registry, not the process-global one)."""

    _PAUSE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self, loop: EngineLoop) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.tokens = Counter("eep_generated_tokens", "Tokens committed", registry=r)
        self.running = Gauge("eep_running_requests", "Requests running (admitted, holding a KV slot)", registry=r)
        self.waiting = Gauge("eep_queued_requests", "Requests waiting for admission", registry=r)
        self.epoch = Gauge("eep_membership_epoch", "Committed membership epoch", registry=r)
        self.active = Gauge("eep_active_ranks", "Ranks in the view", registry=r)
        self.repaired = Counter("eep_repaired_experts", "Experts served again after a failure, by tier", ["tier"],
                                registry=r)
        self.step = Histogram("eep_step_seconds", "Wall time of one engine step", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
        self.recovery = Histogram("eep_recovery_pause_seconds", "Repair time after a failure (view change to "
                                  "new tables)", buckets=self._PAUSE_BUCKETS, registry=r)
        self.rejoin = Histogram("eep_rejoin_pause_seconds", "Time healthy ranks pause to switch a rank in",
                                buckets=self._PAUSE_BUCKETS, registry=r)
        # eep.runtime.accounting: what elastic membership costs while serving, against all the work
        self.bookkeeping = Counter("eep_bookkeeping_cpu_seconds", "CPU time of elastic-membership bookkeeping "
                                   "(heartbeats, their checks, step-boundary membership work, repair planning)",
                                   ["what"], registry=r)
        self.cpu = Counter("eep_cpu_seconds", "CPU time of the controller process and every rank process",
                           registry=r)
        # online EPLB (eep.control.rebalance): the layout in use under the load of the recent window
        self.imbalance = Gauge("eep_expert_load_imbalance", "Most loaded rank's expert load over the mean of the "
                               "active ranks, per MoE layer, of the tables in use under the recent load window",
                               ["layer"], registry=r)
        self.rebalances = Counter("eep_rebalances", "Rebalances switched in (a new expert layout)", registry=r)
        self.moves = Counter("eep_expert_moves", "Experts copied by rebalances, by source", ["source"], registry=r)
        self._seen_moves: dict[str, int] = {}
        self._seen_rebalances = 0
        self._seen_cpu: dict[str, float] = {}
        self._seen_tokens = 0
        self._seen_repairs: set[tuple[int, str]] = set()
        loop.on_step = self.step.observe

    def render(self, snap: dict[str, Any], queued: int) -> bytes:
        from prometheus_client import generate_latest

        self.tokens.inc(max(0, snap["tokens"] - self._seen_tokens))
        self._seen_tokens = snap["tokens"]
        self.running.set(snap["running"])
        self.waiting.set(snap["waiting"] + queued)
        self.epoch.set(snap["epoch"])
        self.active.set(snap["active"])
        if (acct := snap.get("accounting")) is not None:
            for what, seconds in [*acct["bookkeeping_cpu_s"].items(), ("", acct["cpu_s"])]:
                grew = seconds - self._seen_cpu.get(what, 0.0)
                self._seen_cpu[what] = seconds
                (self.bookkeeping.labels(what=what) if what else self.cpu).inc(max(0.0, grew))
        if (eplb := snap.get("eplb")) is not None:
            self._eplb(eplb)
        for rec in snap["repairs"]:
            key = (int(rec["epoch"]), "rejoin" if "rejoined" in rec else "repair")
            if key in self._seen_repairs:
                continue
            self._seen_repairs.add(key)
            if key[1] == "rejoin":
                self.rejoin.observe(float(rec["pause_s"]))
            else:
                self.recovery.observe(float(rec["total_s"]))
                self.repaired.labels(tier="1").inc(int(rec["tier1_experts"]))
                self.repaired.labels(tier="2").inc(int(rec["tier2_experts"]))
        return generate_latest(self.registry)

    def _eplb(self, eplb: dict[str, Any]) -> None:
        for layer, value in enumerate(eplb["imbalance"]):
            self.imbalance.labels(layer=str(layer)).set(value)
        self.rebalances.inc(max(0, eplb["switched"] - self._seen_rebalances))
        self._seen_rebalances = eplb["switched"]
        for source, n in eplb["moves"].items():
            self.moves.labels(source=source).inc(max(0, n - self._seen_moves.get(source, 0)))
            self._seen_moves[source] = n
