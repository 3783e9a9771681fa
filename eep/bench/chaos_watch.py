"""The chaos soak's view of the server: /membership polled, its events kept, its API called.

`ServerWatch` holds what the soak knows of the instance, all from the server's structured
status (never its log or an event's `detail` text): each rank's state (`view.ranks`) and pid
(`pids`), whether it is paused, the events it recorded (deduplicated across polls; each event's
`pids` names every process it saw, so a joiner killed within a poll period is still known),
every change of the rank states (`view_changes`), and at each poll whether every rank was
active (`samples`). It also owns the soak's clock (time since the load started) and its admin
calls (`Authorization: Bearer` the key the harness started the server with).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from eep.bench.harness import ServerHandle

POLL_S = 0.1  # /membership polling period
POLL_TIMEOUT_S = 2.0  # a poll the server does not answer in this keeps the last view
ADMIN_TIMEOUT_S = 70.0  # admin calls run on the engine loop (the server gives them 60 s)


class ServerWatch:
    """The server's state as last polled, and the soak's clock (one event loop)."""

    def __init__(self, srv: ServerHandle) -> None:
        self.srv = srv
        self.clock = self.wall0 = 0.0
        self.http: Any = None
        self.auth = {"Authorization": f"Bearer {srv.admin_key}"}  # the harness starts it with --admin-api-key
        self.samples: list[tuple[float, bool]] = []  # (poll time, every rank active)
        self.view_changes: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # the server's, gathered as polled (it keeps the last 1000)
        self._event_keys: set[tuple[Any, ...]] = set()
        self.states: list[str] = []
        self.pids: list[int] = []
        self.paused: str | None = None
        self.pids_seen: set[int] = set()
        self.poll_failures = 0

    def open(self) -> Any:
        """The HTTP client of the polls and admin calls (the caller enters and closes it)."""
        import httpx

        self.http = httpx.AsyncClient(base_url=self.srv.url, timeout=httpx.Timeout(ADMIN_TIMEOUT_S))
        return self.http

    def start_clock(self) -> None:
        self.clock, self.wall0 = time.monotonic(), time.time()

    def now(self) -> float:
        return time.monotonic() - self.clock

    def server_gone(self) -> bool:
        return self.srv.proc is None or self.srv.proc.poll() is not None

    def in_state(self, state: str) -> list[int]:
        return [r for r, s in enumerate(self.states) if s == state]

    def all_active(self) -> bool:
        return bool(self.states) and all(s == "active" for s in self.states)

    async def poll_forever(self) -> None:
        while True:
            status = await self.get("/membership", timeout=POLL_TIMEOUT_S)
            if status is None:
                self.poll_failures += 1
            else:
                self.read_status(status)
            self.samples.append((self.now(), self.all_active()))
            await asyncio.sleep(POLL_S)

    async def refresh(self) -> None:
        """A fresh view before a decision (the poller's may be 0.1 s old)."""
        status = await self.get("/membership", timeout=POLL_TIMEOUT_S)
        if status is not None:
            self.read_status(status)

    def read_status(self, status: dict[str, Any]) -> None:
        ranks = status["view"]["ranks"]
        states = [r["state"] for r in ranks]
        pids = [int(p) for p in status["pids"]]
        self.pids_seen.update(p for p in pids if p)
        paused = status.get("paused")
        self._read_events(status.get("events") or [])
        if states != self.states or paused != self.paused or pids != self.pids:
            self.view_changes.append({"t": round(self.now(), 4), "epoch": status["view"].get("epoch"),
                                      "states": states, "pids": pids, "paused": paused})
        self.states, self.pids, self.paused = states, pids, paused

    def _read_events(self, events: list[dict[str, Any]]) -> None:
        """Keep the events not seen before (they come oldest first), and every process they
        record: a joiner killed within a poll period shows only here."""
        last = self.events[-1]["time"] if self.events else float("-inf")
        new = []
        for e in reversed(events):
            if e.get("time", 0.0) < last:
                break
            key = (e.get("time"), e.get("kind"), e.get("rank"), e.get("epoch"), e.get("detail"))
            if key not in self._event_keys:
                self._event_keys.add(key)
                new.append({**e, "t": round(e.get("time", 0.0) - self.wall0, 4)})
        for e in reversed(new):
            self.events.append(e)
            self.pids_seen.update(int(p) for p in e["pids"] if p)

    async def get(self, path: str, timeout: float = POLL_TIMEOUT_S) -> dict[str, Any] | None:
        import httpx

        try:
            resp = await self.http.get(path, timeout=timeout)
            return resp.json() if resp.status_code == 200 else None  # type: ignore[no-any-return]
        except (httpx.HTTPError, ValueError):
            return None

    async def health(self) -> tuple[int, str]:
        """/health's status code and `status` (0 and the error's name: no answer)."""
        import httpx

        try:
            resp = await self.http.get("/health", timeout=POLL_TIMEOUT_S)
            return resp.status_code, str(resp.json().get("status"))
        except (httpx.HTTPError, ValueError) as e:
            return 0, type(e).__name__

    async def admin(self, action: str, rank: int) -> tuple[int, str]:
        """`POST /admin/ranks/{rank}/{action}`: its status (0: no answer) and the start of its body."""
        import httpx

        try:
            resp = await self.http.post(f"/admin/ranks/{rank}/{action}", headers=self.auth)
            return resp.status_code, resp.text[:300]
        except httpx.HTTPError as e:
            return 0, f"{type(e).__name__}: {e}"
