"""`eep bench head` (root): node 0 lost under load, and a standby head that takes over.

What `run_head_bench` promises. Three namespace hosts (`eep.testbed.netns`) x two ranks, a real
three-member etcd (one member per host), the head on node 0 (HTTP on its address) and a standby
head on node 1 (`eep serve --standby`, the head's flags). First every request is run once,
unbroken, against the head: its tokens are the reference. Then, per schedule, `concurrency`
streaming clients (greedy and seeded alternately, EOS ignored; `RetryingStream`) start against
the head and, once each has a token, node 0 is lost:
- `killed`: its link cut and every process on it SIGKILLed;
- `partitioned`: its link cut only; the old head lives on, cut off, and is healed at the end.
A client whose stream breaks sends the same request to the other head's address with the
standard `Last-Event-ID` (and the same `X-Request-Id`) until it has `[DONE]`; two more clients
send non-streaming completions and retry them with the same `X-Request-Id`.

Figures (`summary`, per schedule): `takeover_s` (node 0's loss to the first token a client got
from the new head), `requests_lost` (clients without `[DONE]`), `outputs_differing` (token ids
unlike the unbroken run's), `ranks_restarted` (surviving hosts' ranks whose process changed:
must be 0), `views_committed_by_two_heads` (epochs both heads' logs say they committed),
`old_head_served_after_loss_s` (partitioned: from the cut to the old head's "stops serving"),
and `tokens` per 100 ms over the run (`bins`; the picture).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from eep.bench.harness.record import provenance
from eep.dataplane.shm import sweep_orphans
from eep.errors import ConfigError
from eep.membership.store import EtcdStore
from eep.testbed.etcd import EtcdCluster
from eep.testbed.instance import HostsInstance
from eep.testbed.netns import NamespaceHosts, available, entered

logger = logging.getLogger(__name__)

HTTP_PORT = 8300
SCHEDULES = ("killed", "partitioned")
NON_STREAMING = 2  # clients besides the streams: a completion retried with the same X-Request-Id
BIN_S = 0.1


def request_body(model: str, i: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    """Client i's request: greedy for even i, seeded sampling for odd i."""
    sampled = {"temperature": 0.9, "seed": 100 + i} if i % 2 else {"temperature": 0}
    return {"model": model, "prompt": [5 + i, 17, 300, 41], "max_tokens": max_tokens, "ignore_eos": True,
            "return_token_ids": True, "stream": stream, **sampled}


class RetryingStream:
    """One streaming client in namespace `netns`: when its stream breaks (a read silent for
    `read_s`, a refused or failed request), it sends the same request to the next address of
    `urls` with `Last-Event-ID` until it has `[DONE]` or `deadline_s` passed."""

    def __init__(self, netns: str, urls: list[str], body: dict[str, Any], rid: str, *, read_s: float = 3.0,
                 deadline_s: float = 120.0) -> None:
        self.netns, self.urls, self.body, self.rid = netns, urls, body, rid
        self.read_s, self.deadline_s = read_s, deadline_s
        self.ids: list[int] = []
        self.stamps: list[float] = []  # monotonic time of each token
        self.first_after_retry: float | None = None
        self.retries = 0
        self.error: BaseException | None = None
        self.done = False
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self._stream()
        except BaseException as e:
            self.error = e
        finally:
            self.started.set()

    def _complete(self, deadline: float) -> None:
        """Non-streaming: the same request, with the same `X-Request-Id`, until one answer."""
        which = 0
        self.started.set()
        while time.monotonic() < deadline:
            try:
                with entered(self.netns):
                    resp = httpx.post(f"{self.urls[which]}/v1/completions", json=self.body,
                                      headers={"X-Request-Id": self.rid}, timeout=httpx.Timeout(10.0, read=10.0))
                if resp.status_code == 200:
                    self.ids = list(resp.json()["choices"][0]["token_ids"])
                    now = time.monotonic()
                    self.stamps = [now] * len(self.ids)
                    if self.retries:
                        self.first_after_retry = now
                    self.done = True
                    return
            except httpx.HTTPError:
                pass
            which, self.retries = 1, self.retries + 1
            time.sleep(0.2)
        raise AssertionError(f"{self.rid}: no completion in time")

    def _stream(self) -> None:
        if not self.body.get("stream"):
            self._complete(time.monotonic() + self.deadline_s)
            return
        last: str | None = None
        which = 0
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            headers = {"X-Request-Id": self.rid, **({"Last-Event-ID": last} if last else {})}
            try:
                with entered(self.netns), httpx.stream(
                        "POST", f"{self.urls[which]}/v1/completions", json=self.body, headers=headers,
                        timeout=httpx.Timeout(10.0, read=self.read_s)) as resp:
                    if resp.status_code == 200:
                        if last is None:  # the whole stream again
                            self.ids, self.stamps = [], []
                        for line in resp.iter_lines():
                            if line.startswith("id: "):
                                last = line[4:]
                            elif line == "data: [DONE]":
                                self.done = True
                                return
                            elif line.startswith("data: "):
                                data = json.loads(line[6:])
                                if "error" in data:
                                    break
                                new = data["choices"][0]["token_ids"]
                                now = time.monotonic()
                                self.ids += new
                                self.stamps += [now] * len(new)
                                self.started.set()
                                if self.retries and self.first_after_retry is None:
                                    self.first_after_retry = now
            except httpx.HTTPError:
                pass
            which = (which + 1) % len(self.urls) if which == 0 else which  # to the other head, and stay
            self.retries += 1
            time.sleep(0.2)


def _commits(log: str) -> list[int]:
    """The epochs a head's log says it committed."""
    return [int(m) for m in re.findall(r"membership view_committed epoch=(\d+)", log)]


def _stamp(log: str, needle: str) -> float | None:
    """The wall-clock time of the first log line holding `needle`."""
    for line in log.splitlines():
        if needle in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def run_schedule(model_path: str, loss: str, *, concurrency: int = 16, max_tokens: int = 40,
                 failure_timeout_s: float = 1.0, head_lease_ttl_s: float = 2.0) -> dict[str, Any]:
    """One schedule (`killed` or `partitioned`) on fresh hosts; the figures and what they came from."""
    if loss not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {loss!r}")
    args = ["--dtype", "float32", "--max-model-len", str(max_tokens + 16), "--failure-timeout", str(failure_timeout_s),
            "--max-num-seqs", str(concurrency), "--ep-num-redundant-experts", "2",  # 66 slots over 6 ranks
            "--head-lease-ttl", str(head_lease_ttl_s)]
    model = Path(model_path).name
    with NamespaceHosts(3, prefix=f"eepb{uuid.uuid4().hex[:6]}") as hosts, EtcdCluster(hosts) as cluster:
        instance = f"b{uuid.uuid4().hex[:6]}"
        # every host lists its own etcd member first, as a deployment does
        ends = cluster.endpoints
        inst = HostsInstance(hosts, model_path, ep_size=6, nnodes=3, args=[
            *args, "--instance", instance, "--http", f"{hosts.addresses[0]}:{HTTP_PORT}"],
            node_args={n: ["--etcd-endpoints", ",".join(ends[n:] + ends[:n])] for n in range(3)})
        credentials = cluster.grant(instance, inst.secret)
        client_ns = hosts.names[2]
        old_head_pid = None
        try:
            inst.start()
            old_head_pid = inst.head.pid if inst.head is not None else None
            head = inst.ready_line.rsplit(" http ", 1)[1].strip()
            standby = inst.start_standby(1, f"{hosts.addresses[1]}:{HTTP_PORT}")
            with entered(client_ns):
                reference = [httpx.post(f"{head}/v1/completions", json=request_body(model, i, max_tokens, False),
                                        timeout=120).json()["choices"][0]["token_ids"]
                             for i in range(concurrency + NON_STREAMING)]
                before = httpx.get(f"{head}/membership", timeout=30).json()
            survivors = {r: before["pids"][r] for r in range(2, 6)}  # the ranks of nodes 1 and 2
            clients = [RetryingStream(client_ns, [head, standby], request_body(model, i, max_tokens, i < concurrency),
                                      f"c{i}") for i in range(concurrency + NON_STREAMING)]
            t_start = time.monotonic()
            for c in clients:
                c.thread.start()
            for c in clients:
                c.started.wait(60)
            lost, lost_at = time.monotonic(), time.time()
            hosts.cut(0)
            if loss == "killed":
                hosts.kill_all(0)
            for c in clients:
                c.thread.join(c.deadline_s + 30)
            heads = _read_heads(hosts, inst, cluster, instance, credentials, head, standby, loss, lost_at,
                                request_body(model, 0, max_tokens, False))
            return _record(loss, clients, reference, survivors, heads, t_start, lost)
        finally:
            inst.stop()
            inst.remove()
            if loss == "killed" and old_head_pid is not None:  # its host's next start sweeps them the same way
                sweep_orphans()


def _read_heads(hosts: NamespaceHosts, inst: HostsInstance, cluster: EtcdCluster, instance: str,
                credentials: tuple[str, str], head: str, standby: str, loss: str, lost_at: float,
                fresh: dict[str, Any]) -> dict[str, Any]:
    """After the run: the new head's state, a fresh request on it, etcd's leader and epoch; with
    `partitioned`, node 0 healed and the old head's health and when it stopped serving; the
    epochs each head's log says it committed."""
    with entered(hosts.names[2]):
        after = httpx.get(f"{standby}/membership", timeout=30).json()
        health = httpx.get(f"{standby}/health", timeout=30).status_code
        again = httpx.post(f"{standby}/v1/completions", json=fresh, timeout=120).json()["choices"][0]["token_ids"]
        store = EtcdStore(cluster.endpoints[2], instance, credentials=credentials)
        try:
            leader, committed = store.leader(), store.current()
        finally:
            store.close()
    old_health, served_after = None, None
    if loss == "partitioned":
        hosts.heal(0)
        with entered(hosts.names[2]):
            old = httpx.get(f"{head}/health", timeout=30)
        old_health = {"code": old.status_code, **old.json()}
        stopped_at = _stamp(inst.log_tail(0, 1 << 22), "the engine loop stops serving")
        served_after = None if stopped_at is None else round(stopped_at - lost_at, 3)
    return {"after": after, "health": health, "again": again, "leader": (leader or {}).get("head"),
            "committed_epoch": committed.epoch if committed is not None else None, "old_health": old_health,
            "served_after": served_after, "old_epochs": _commits(inst.log_tail(0, 1 << 22)),
            "new_epochs": _commits(inst.standby_log(1, 1 << 22)), "standby_log_tail": inst.standby_log(1, 3000)}


def _record(loss: str, clients: list[RetryingStream], reference: list[list[int]], survivors: dict[int, int],
            heads: dict[str, Any], t_start: float, lost: float) -> dict[str, Any]:
    """The figures of one schedule and what they came from."""
    after = heads["after"]
    resumed = [c.first_after_retry for c in clients if c.first_after_retry is not None and c.body.get("stream")]
    stamps = sorted(t for c in clients for t in c.stamps)
    bins = [0] * (int((max(stamps, default=t_start) - t_start) / BIN_S) + 1)
    for t in stamps:
        bins[int((t - t_start) / BIN_S)] += 1
    return {
        "schedule": loss,
        "summary": {
            # the first token a stream got from the new head (a completion's tokens all come at its end)
            "takeover_s": round(min(resumed) - lost, 3) if resumed else None,
            "requests_lost": sum(not c.done for c in clients),
            "outputs_differing": sum(c.done and c.ids != reference[i] for i, c in enumerate(clients)),
            "ranks_restarted": sum(after["pids"][r] != pid for r, pid in survivors.items()),
            "views_committed_by_two_heads": len(set(heads["old_epochs"]) & set(heads["new_epochs"])),
            "old_head_served_after_loss_s": heads["served_after"],
        },
        "new_head": {"health": heads["health"], "active": after["view"]["active"], "epoch": after["view"]["epoch"],
                     "leader": heads["leader"], "committed_epoch": heads["committed_epoch"],
                     "new_request_exact": heads["again"] == reference[0],
                     "events": [e for e in after["events"] if e["kind"] in ("taken_over", "view_committed")]},
        "old_head": {"health": heads["old_health"], "epochs": heads["old_epochs"]},
        "clients": [{"i": i, "done": c.done, "tokens": len(c.ids), "retries": c.retries,
                     "error": None if c.error is None else repr(c.error)} for i, c in enumerate(clients)],
        "differing": [i for i, c in enumerate(clients) if c.done and c.ids != reference[i]],
        "bins": bins, "lost_at_s": round(lost - t_start, 3), "bin_s": BIN_S,
        "standby_log_tail": heads["standby_log_tail"],
    }


def run_head_bench(model_path: str, *, schedules: tuple[str, ...] = SCHEDULES, concurrency: int = 16,
                   max_tokens: int = 40, failure_timeout_s: float = 1.0,
                   head_lease_ttl_s: float = 2.0) -> dict[str, Any]:
    if (why := available()) is not None:
        raise ConfigError(f"eep bench head needs network namespaces: {why}")
    runs = {s: run_schedule(model_path, s, concurrency=concurrency, max_tokens=max_tokens,
                            failure_timeout_s=failure_timeout_s, head_lease_ttl_s=head_lease_ttl_s)
            for s in schedules}
    target = head_lease_ttl_s + failure_timeout_s + 1.0
    return {"config": {"model_path": model_path, "schedules": list(schedules), "concurrency": concurrency,
                       "max_tokens": max_tokens, "failure_timeout_s": failure_timeout_s,
                       "head_lease_ttl_s": head_lease_ttl_s, "hosts": 3, "ranks_per_host": 2},
            "provenance": provenance(),
            "summary": {s: r["summary"] for s, r in runs.items()} | {"takeover_target_s": target},
            "runs": runs}


def summary_table(result: dict[str, Any]) -> str:
    rows = ["| schedule | takeover_s | lost | differing | ranks restarted | views by two heads | old head served after |",
            "|---|---|---|---|---|---|---|"]
    for s in result["config"]["schedules"]:
        m = result["summary"][s]
        rows.append(f"| {s} | {m['takeover_s']} | {m['requests_lost']} | {m['outputs_differing']} | "
                    f"{m['ranks_restarted']} | {m['views_committed_by_two_heads']} | "
                    f"{m['old_head_served_after_loss_s']} |")
    return "\n".join(rows)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], runs.items()):
        xs = [i * run["bin_s"] for i in range(len(run["bins"]))]
        ax.plot(xs, [b / run["bin_s"] for b in run["bins"]], lw=1)
        ax.axvline(run["lost_at_s"], color="red", ls="--", lw=1, label="node 0 lost")
        takeover = run["summary"]["takeover_s"]
        if takeover is not None:
            ax.axvline(run["lost_at_s"] + takeover, color="green", ls=":", lw=1, label="first token, new head")
        ax.set_title(f"{name}: takeover {takeover} s, lost {run['summary']['requests_lost']}, "
                     f"differing {run['summary']['outputs_differing']}")
        ax.set_ylabel("tokens/s")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
