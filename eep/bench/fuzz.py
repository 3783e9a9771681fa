"""`eep bench fuzz`: every door of a live two-host instance attacked while it serves (root).

What `run_fuzz_bench` promises. Three network namespaces (`eep.testbed.netns`): hosts 0 and 1
run one eep instance (`ranks_per_host` ranks each, its cluster secret, HTTP on host 0), host 2
is the attacker, a stranger on the same network. While `concurrency` streaming clients run on
host 0 (the trace and clients of `eep bench failure`), the attacker, in a seeded order, knocks
on every listening port: the controller (`--dist-init-addr`), every rank's data address, every
host's expert backup server and the HTTP frontend, with
  - a connection opened and closed, one that sends nothing, random bytes;
  - the issue's proof of concept: a `multiprocessing.connection` frame with a pickle whose
    `__reduce__` creates the canary file (and the same pickle as a ZeroMQ frame, as an HTTP body);
  - another cluster's secret (the control handshake; CURVE with another key pair);
  - the right secret, then malformed traffic: a frame cut short, one over the size bound, a
    message of the wrong type, one of no known type, a ZeroMQ frame of the wrong shape, a
    request for experts that do not exist;
  - replays: bytes of the live instance's own traffic, captured on host 1's link (raw packets
    in the bridge's namespace) and sent again in new connections, and the recorded bytes of a
    whole authenticated CURVE connection sent again in a new one; old (epoch, step) frames
    sent again by an authenticated peer;
  - `connections` connections opened and dropped across all ports.
Every attempt is bounded in time. Then, after the doors have closed what was left open, the
figures (`summary`): `attempts`, `code_executed` (the canary exists), `requests_lost`,
`outputs_differing` (against the single-process engine, greedy), `ranks_failed` (ranks any
`fault_seen` event named during the run), `healthy_at_end` (`/health` 200, every rank active,
a new request answered), `fd_growth` (open files of every process on hosts 0 and 1, after
minus before), `rejections_logged` (lines `rejected door=...` in the instance's logs, and the
counts of those a flood made the log sum up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import random
import re
import secrets
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eep.bench.harness import (
    BenchFailed,
    ClosedLoop,
    NamespaceServer,
    RequestRecord,
    Trace,
    complete,
    http_client,
    membership,
    provenance,
    start_namespace_server,
    warm,
)
from eep.bench.steady import checkpoint_vocab
from eep.errors import ConfigError
from eep.testbed.netns import NamespaceHosts, available, pids_in, run_in

logger = logging.getLogger(__name__)

_PORT = 29500
_HTTP_PORT = 8100
_SETTLE_S = 12.0  # the longest any door keeps a peer that never finishes its handshake, and then some


class _Payload:
    """The proof of concept: unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def run_fuzz_bench(
    model_path: str,
    *,
    ranks_per_host: int = 2,
    concurrency: int = 16,
    prompt_len: int = 16,
    output_len: int = 24,
    connections: int = 2000,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, Any]:
    if (why := available()) is not None:
        raise ConfigError(f"eep bench fuzz needs network namespaces: {why}")
    ep_size = 2 * ranks_per_host
    trace = Trace(seed, checkpoint_vocab(model_path), prompt_len, output_len)
    per_rank = -(-concurrency // ep_size)
    args = ["--dtype", dtype, "--max-model-len", str(trace.max_model_len), "--max-num-seqs", str(per_rank)]
    canary = Path(tempfile.mkdtemp(prefix="eep-fuzz-")) / "code-executed"
    result: dict[str, Any] = {"config": {"ranks_per_host": ranks_per_host, "concurrency": concurrency,
                                         "prompt_len": prompt_len, "output_len": output_len,
                                         "connections": connections, "seed": seed, "dtype": dtype}}
    with NamespaceHosts(3, prefix=f"eepf{uuid.uuid4().hex[:5]}") as net:
        srv = start_namespace_server(net, model_path, nnodes=2, ep_size=ep_size, port=_PORT, http_port=_HTTP_PORT,
                                     args=args)
        try:
            attacker = _Attacker(net, srv, _doors(net, ep_size), canary, seed, _num_experts(model_path))
            seen = _attack_under_load(net, srv, attacker, trace, concurrency, connections)
        finally:
            srv.stop()
    records: list[RequestRecord] = seen["records"]
    reference = _reference(model_path, trace, [r.index for r in records if r.complete], dtype)
    result["summary"] = _summary(attacker, canary, records, reference, seen)
    result["attempts_by_kind"] = dict(sorted(attacker.by_kind.items()))
    result["captured_replays"] = attacker.captured
    before, after = seen["before"], seen["after"]
    result["open_files"] = {"before": {str(p): len(v) for p, v in before.items()},
                            "after": {str(p): len(v) for p, v in after.items()}, "grown": seen["growth"]["by_process"]}
    result["errors"] = sorted({r.error for r in records if r.error})[:5]
    result |= provenance()
    with contextlib.suppress(OSError):
        canary.unlink()
        canary.parent.rmdir()
    return result


def _attack_under_load(net: NamespaceHosts, srv: NamespaceServer, attacker: _Attacker, trace: Trace,
                       concurrency: int, connections: int) -> dict[str, Any]:
    """The attacks while the clients run on host 0; then the doors' settling, the open files
    before and after, the instance's health and its logs: what the summary is made of."""
    run_in(net.names[0], lambda: asyncio.run(_warm(srv, trace, concurrency)))
    attacker.warm_backups()  # their first answer starts pyzmq's zero-copy collector: not a leak
    before = _open_files(net)
    stop = threading.Event()
    load: dict[str, Any] = {}

    def clients() -> None:
        try:
            load.update(run_in(net.names[0], lambda: asyncio.run(_load(srv, trace, concurrency, stop)),
                               timeout_s=3600))
        except BaseException as e:  # noqa: BLE001 - raised below, in the bench's thread
            load["error"] = e

    thread = threading.Thread(target=clients, daemon=True)
    thread.start()
    time.sleep(1.0)
    logger.info("[fuzz] %d doors: %s", len(attacker.doors), ", ".join(d.name for d in attacker.doors))
    try:
        attacker.run(connections)
    finally:
        logger.info("[fuzz] %d attempts made; waiting %.0f s for the doors to close what was left open",
                    attacker.attempts, _SETTLE_S)
        time.sleep(_SETTLE_S)
        stop.set()
        thread.join(600)
        time.sleep(1.0)  # the frontend closes the clients' connections
    if "error" in load or thread.is_alive():
        raise BenchFailed(f"the clients failed: {load.get('error') or 'still running 600 s after the stop'}")
    after = _open_files(net)
    status = run_in(net.names[0], lambda: asyncio.run(_health(srv, trace)))
    logs = "\n".join(srv.inst.log_tail(n, chars=50_000_000) for n in (0, 1))
    return {"records": load["records"], "before": before, "after": after, "growth": _growth(before, after),
            "status": status, "logs": logs}


def _summary(attacker: _Attacker, canary: Path, records: list[RequestRecord], reference: dict[int, list[int]],
             seen: dict[str, Any]) -> dict[str, Any]:
    events, logs = seen["status"]["events"], seen["logs"]
    # The one figure read off the logs, by design: that the doors say what they refused (a
    # bounded log, `eep.security.rejections`); the server exposes no structured count of it
    suppressed = sum(int(m) for m in re.findall(r"rejected door=\S+: (\d+) more peers", logs))
    return {
        "attempts": attacker.attempts,
        "code_executed": canary.exists(),
        "requests": len(records),
        "requests_lost": sum(not r.complete for r in records),
        "outputs_differing": sum(r.token_ids != reference[r.index] for r in records if r.complete),
        "ranks_failed": len({e["rank"] for e in events if e["kind"] == "fault_seen"}),
        "healthy_at_end": seen["status"]["healthy"],
        "fd_growth": seen["growth"]["total"],
        "rejections_logged": len(re.findall(r"rejected door=\S+ peer=", logs)) + suppressed,
    }


class _Door:
    def __init__(self, name: str, kind: str, host: int, address: str, port: int) -> None:
        self.name, self.kind, self.host, self.address, self.port = name, kind, host, address, port


def _doors(net: NamespaceHosts, ep_size: int) -> list[_Door]:
    """Every port the instance listens on, from its launch arguments (as an attacker learns
    them: the documented port layout)."""
    from eep.runtime.backup_server import backup_address

    per_host = ep_size // 2
    doors = [_Door("controller", "control", 0, net.addresses[0], _PORT),
             _Door("http", "http", 0, net.addresses[0], _HTTP_PORT)]
    for r in range(ep_size):
        node = r // per_host
        doors.append(_Door(f"rank{r}-data", "data", node, net.addresses[node], _PORT + 1 + r))
    for node in (0, 1):
        port = int(backup_address(net.addresses[node], _PORT, ep_size, node).rsplit(":", 1)[1])
        doors.append(_Door(f"node{node}-backup", "backup", node, net.addresses[node], port))
    return doors


def _num_experts(model_path: str) -> int:
    from eep.model.checkpoint import CheckpointReader
    from eep.model.config import ModelConfig

    with CheckpointReader(model_path) as reader:
        return ModelConfig.from_hf(reader.config).num_experts


def _open_files(net: NamespaceHosts) -> dict[int, list[str]]:
    """pid -> what each of its open files is (`/proc/PID/fd` links), of every process on the
    instance's hosts."""
    out = {}
    for name in net.names[:2]:
        for pid in pids_in(name):
            with contextlib.suppress(OSError):
                fds = os.listdir(f"/proc/{pid}/fd")
                links = []
                for fd in fds:
                    with contextlib.suppress(OSError):
                        links.append(re.sub(r"\[\d+\]", "", os.readlink(f"/proc/{pid}/fd/{fd}")))
                out[pid] = sorted(links)
    return out


def _growth(before: dict[int, list[str]], after: dict[int, list[str]]) -> dict[str, Any]:
    """Open files after minus before, in all and by process (what the new ones are)."""
    from collections import Counter

    grown = {}
    for pid, links in after.items():
        extra = Counter(links) - Counter(before.get(pid, []))
        if extra:
            grown[str(pid)] = {"cmdline": _cmdline(pid), "new": dict(extra)}
    total = sum(len(v) for v in after.values()) - sum(len(v) for v in before.values())
    return {"total": total, "by_process": grown}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


async def _warm(srv: NamespaceServer, trace: Trace, concurrency: int) -> None:
    async with http_client(srv, concurrency) as client:
        await warm(client, srv, trace, concurrency)


async def _load(srv: NamespaceServer, trace: Trace, concurrency: int, stop: threading.Event) -> dict[str, Any]:
    async with http_client(srv, concurrency) as client:
        load = ClosedLoop(client, srv, trace, clock=time.monotonic(), keep_going=lambda: not stop.is_set())
        await asyncio.gather(*load.start(concurrency))
    return {"records": load.records}


async def _health(srv: NamespaceServer, trace: Trace) -> dict[str, Any]:
    async with http_client(srv, 2) as client:
        health = await client.get("/health")
        status = await membership(client)
        fresh = await complete(client, srv.model_name, trace, 10**7, time.monotonic())
    active = status["view"]["active"]
    healthy = health.status_code == 200 and active == list(range(len(status["pids"]))) and fresh.complete
    return {"healthy": healthy, "events": status["events"]}


def _reference(model_path: str, trace: Trace, indices: list[int], dtype: str) -> dict[int, list[int]]:
    """The single-process engine's greedy outputs of the trace's requests `indices`."""
    from eep.config import EngineConfig
    from eep.engine.engine import LLMEngine
    from eep.engine.sampling import SamplingParams

    if not indices:
        return {}
    requests = [trace.request(i) for i in indices]
    engine = LLMEngine(EngineConfig(model_path, dtype=dtype, max_model_len=trace.max_model_len, progress=False))
    try:
        outs = engine.generate([p for p, _ in requests],
                               [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in requests])
    finally:
        engine.close()
    return {i: o.output_ids for i, o in zip(indices, outs)}


class _Attacker:
    """The stranger on host 2 (and, for the replays it captures, a sniffer on host 1's link)."""

    def __init__(self, net: NamespaceHosts, srv: NamespaceServer, doors: list[_Door], canary: Path, seed: int,
                 num_experts: int) -> None:
        from eep.security.secret import ClusterSecret

        self.net, self.doors, self.canary, self.num_experts = net, doors, canary, num_experts
        self.secret = srv.inst.secret  # an insider's credential: for the right-secret malformed traffic
        self.other = ClusterSecret(secrets.token_bytes(32))
        self.rng = random.Random(seed)
        self.attempts = 0
        self.by_kind: dict[str, int] = {}
        self.captured = 0
        self._lock = threading.Lock()
        self.poc = pickle.dumps(_Payload(f"touch {canary}"))

    def _count(self, kind: str) -> None:
        with self._lock:
            self.attempts += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def warm_backups(self) -> None:
        """One proper request to every backup server, as a repair makes (every expert of layer 0)."""
        for d in self.doors:
            if d.kind == "backup":
                n = self.num_experts
                request = struct.pack(f"<{2 * n}i", *[v for e in range(n) for v in (0, e)])
                run_in(self.net.names[2], lambda d=d, r=request: self._zmq(d, self.secret, [b"", r]), timeout_s=60)

    def run(self, connections: int) -> None:
        captured = self._capture()
        plan: list[tuple[str, _Door, Callable[[_Door], None]]] = []
        for door in self.doors:
            for kind, fn in self._attacks(door.kind):
                plan.append((kind, door, fn))
        self.rng.shuffle(plan)
        # the silent ones hold their connection until the door drops it: all at once, beside the rest
        silent = [p for p in plan if p[0] == "silent"]
        rest = [p for p in plan if p[0] != "silent"]
        holders = [threading.Thread(target=self._in_attacker, args=(p,), daemon=True) for p in silent]
        for t in holders:
            t.start()
        for p in rest:
            self._in_attacker(p)
        for door, payloads in captured.items():
            for payload in payloads:
                self._in_attacker(("captured_replay", door, lambda d, b=payload: self._send_raw(d, b)))
        self._flood(connections)
        for t in holders:
            t.join(30)

    def _in_attacker(self, item: tuple[str, _Door, Callable[[_Door], None]]) -> None:
        kind, door, fn = item
        self._count(kind)
        try:
            run_in(self.net.names[2], lambda: fn(door), timeout_s=60)
        except Exception as e:  # noqa: BLE001 - a refused attack may raise anything on our side
            logger.debug("attack %s on %s: %s", kind, door.name, e)

    # -- the attacks ---------------------------------------------------------------------------
    def _attacks(self, kind: str) -> list[tuple[str, Callable[[_Door], None]]]:
        common: list[tuple[str, Callable[[_Door], None]]] = [
            ("connect_close", lambda d: self._connect(d).close()),
            ("silent", self._silent),
            ("random_bytes", lambda d: self._send_raw(d, self.rng.randbytes(self.rng.randint(1, 4096)))),
            ("poc_pickle_frame", lambda d: self._send_raw(d, struct.pack("!i", len(self.poc)) + self.poc)),
        ]
        if kind == "control":
            return common + [
                ("wrong_secret", self._wrong_secret_control),
                ("truncated_frame", lambda d: self._control(d, raw=struct.pack("!I", 1000) + b"x" * 10)),
                ("oversize_frame", lambda d: self._control(d, raw=struct.pack("!I", 2**31 - 1))),
                ("wrong_type", lambda d: self._control(d, payload=self._wrong_type())),
                ("unknown_type", lambda d: self._control(d, payload=self._unknown_type())),
                ("poc_after_handshake", lambda d: self._control(d, payload=self.poc)),
            ]
        if kind == "http":
            return common + [
                ("poc_http_body", lambda d: self._http(d, self.poc)),
                ("wrong_type", lambda d: self._http(d, b'{"model": 1, "prompt": {"x": []}, "max_tokens": "a"}')),
                ("oversize_frame", lambda d: self._http(d, b"", claimed=2**30)),
            ]
        return common + [
            ("zmq_without_curve", lambda d: self._zmq(d, None, [self.poc])),
            ("wrong_secret", lambda d: self._zmq(d, self.other, [self.poc])),
            ("zmq_wrong_shape", lambda d: self._zmq(d, self.secret, [b"x", b"y", b"z"] if kind == "data"
                                                     else [b"", b"\x01\x02\x03"])),
            ("zmq_unknown_kind", lambda d: self._zmq(d, self.secret, [struct.pack("<BIQQ", 99, 0, 0, 0), b""]
                                                     if kind == "data" else [b"", struct.pack("<ii", 10**6, -5)])),
            ("zmq_oversize", lambda d: self._zmq(d, self.secret, [b"\0" * 21, b"\0" * (64 * 2**20)])),
            ("poc_after_handshake", lambda d: self._zmq(d, self.secret, [self.poc])),
            ("authenticated_replay", self._authenticated_replay if kind == "data" else
             lambda d: self._zmq(d, self.secret, [b"", b"\0" * 8])),
            ("replay_of_recorded_connection", self._recorded_connection_replay),
        ]

    def _connect(self, d: _Door, timeout_s: float = 5.0) -> socket.socket:
        return socket.create_connection((d.address, d.port), timeout=timeout_s)

    def _send_raw(self, d: _Door, data: bytes) -> None:
        with self._connect(d) as s:
            s.sendall(data)
            _until_closed(s, 8.0)

    def _silent(self, d: _Door) -> None:
        with self._connect(d) as s:
            _until_closed(s, 15.0)

    def _wrong_secret_control(self, d: _Door) -> None:
        from eep.security.channel import client_handshake

        with contextlib.suppress(OSError):
            client_handshake(self._connect(d), self.other.key("control handshake")).close()

    def _control(self, d: _Door, *, raw: bytes | None = None, payload: bytes | None = None) -> None:
        from eep.security.channel import client_handshake

        ch = client_handshake(self._connect(d), self.secret.key("control handshake"))
        try:
            if raw is not None:
                ch.sock.sendall(raw)
            else:
                ch.send_bytes(payload or b"")
            _until_closed(ch.sock, 8.0)
        finally:
            ch.close()

    def _wrong_type(self) -> bytes:
        import msgspec

        return msgspec.msgpack.encode(["AgentHello", {"epoch": "zero", "node": [1], "address": 5, "pid": None}])

    def _unknown_type(self) -> bytes:
        import msgspec

        return msgspec.msgpack.encode(["os.system", {"command": f"touch {self.canary}"}])

    def _http(self, d: _Door, body: bytes, claimed: int | None = None) -> None:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {d.address}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {claimed if claimed is not None else len(body)}\r\n\r\n").encode()
        self._send_raw(d, head + body)

    def _zmq(self, d: _Door, secret: Any, frames: list[bytes]) -> None:
        import zmq

        from eep.security import curve
        from eep.security.curve import CurveKeys

        ctx = zmq.Context()
        try:
            s = ctx.socket(zmq.PUSH if d.kind == "data" else zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if secret is not None:
                curve.connect(s, CurveKeys.from_secret(secret))
            s.connect(f"tcp://{d.address}:{d.port}")
            with contextlib.suppress(zmq.Again):
                s.send_multipart(frames, flags=0, copy=True, track=False) if s.poll(2000, zmq.POLLOUT) else None
            if d.kind == "backup" and s.poll(1000):
                s.recv_multipart()
            time.sleep(0.2)
            s.close(0)
        finally:
            ctx.term()

    def _authenticated_replay(self, d: _Door) -> None:
        """Frames of epochs and steps long past, from a holder of the secret: each dropped."""
        from eep.dataplane.network import _HEADER, DATA

        frames = [[_HEADER.pack(DATA, src, epoch, step), b"\0" * 64] for src in range(4) for epoch in (0,)
                  for step in range(3)]
        for f in frames:
            self._zmq(d, self.secret, f)

    def _recorded_connection_replay(self, d: _Door) -> None:
        """Record the bytes of a whole authenticated CURVE connection (a relay between a
        key-holding client and the door), then send them again in a new connection."""
        relay = socket.create_server((self.net.addresses[2], 0))
        recorded = bytearray()
        done = threading.Event()

        def pump() -> None:
            with contextlib.suppress(OSError):
                client, _ = relay.accept()
                with client, self._connect(d) as up:
                    up.settimeout(0.2)
                    client.settimeout(0.2)
                    end = time.monotonic() + 3.0
                    while time.monotonic() < end:
                        for src, dst, rec in ((client, up, True), (up, client, False)):
                            try:
                                chunk = src.recv(65536)
                            except TimeoutError:
                                continue
                            if not chunk:
                                return
                            if rec:
                                recorded.extend(chunk)
                            dst.sendall(chunk)
            done.set()

        t = threading.Thread(target=pump, daemon=True)  # made in host 2's thread: it runs in host 2
        t.start()
        fake = _Door(d.name, d.kind, 2, self.net.addresses[2], relay.getsockname()[1])
        from eep.dataplane.network import _HEADER, DATA

        self._zmq(fake, self.secret, [_HEADER.pack(DATA, 0, 0, 0), b"\0" * 64] if d.kind == "data"
                  else [b"", struct.pack("<ii", 0, 0)])
        t.join(5)
        relay.close()
        if recorded:
            self._send_raw(d, bytes(recorded))

    def _capture(self) -> dict[_Door, list[bytes]]:
        """TCP payloads of the live instance's own traffic from host 1 to host 0's doors (control
        and data), read off host 1's link in the bridge's namespace (raw packets), ~2 s."""
        targets = {(d.address, d.port): d for d in self.doors if d.host == 0 and d.kind in ("control", "data")}
        out: dict[_Door, list[bytes]] = {}
        src = socket.inet_aton(self.net.addresses[1])

        def sniff() -> None:
            # every protocol: a bridge port hands its frames to the bridge before a tap of one
            # protocol would see them; IPv4 is picked out below
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            s.bind((self.net._bridge_port(1), 0))
            s.settimeout(0.2)
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                try:
                    pkt = s.recv(65536)
                except TimeoutError:
                    continue
                ip = pkt[14:]
                if pkt[12:14] != b"\x08\x00" or len(ip) < 20 or ip[9] != 6 or ip[12:16] != src:
                    continue
                ihl = (ip[0] & 15) * 4
                tcp = ip[ihl:]
                dport = struct.unpack("!H", tcp[2:4])[0]
                door = targets.get((socket.inet_ntoa(ip[16:20]), dport))
                payload = tcp[(tcp[12] >> 4) * 4:struct.unpack("!H", ip[2:4])[0] - ihl]
                if door is not None and payload and len(out.get(door, [])) < 8:
                    out.setdefault(door, []).append(bytes(payload))
            s.close()

        run_in(self.net.bridge_ns, sniff, timeout_s=30)
        self.captured = sum(len(v) for v in out.values())
        logger.info("[fuzz] captured %d packets of the instance's own traffic to replay", self.captured)
        return out

    def _flood(self, connections: int) -> None:
        """`connections` connections opened and dropped, round-robin over every door."""
        def flood() -> None:
            for i in range(connections):
                d = self.doors[i % len(self.doors)]
                with contextlib.suppress(OSError):
                    s = self._connect(d, timeout_s=2.0)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                    s.close()
                self._count("open_and_drop")

        run_in(self.net.names[2], flood, timeout_s=600)


def _until_closed(s: socket.socket, timeout_s: float) -> None:
    """Read (and discard) until the peer closes, or `timeout_s`."""
    s.settimeout(timeout_s)
    with contextlib.suppress(OSError):
        while s.recv(65536):
            pass


def summary_table(result: dict[str, Any]) -> str:
    return "\n".join(f"{k:22s} {v}" for k, v in result["summary"].items())
