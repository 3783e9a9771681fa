"""Where the committed membership lives: `MemoryStore` on one host, `EtcdStore` across hosts.

The controller commits every view change through `commit(expected_epoch, record)`: the new
record becomes current only if the current epoch is still `expected_epoch` (a compare-and-swap
of the epoch key, in one etcd transaction with the record itself), so two controllers, or the
two sides of a partition, can never both commit from the same view. `wait_newer` blocks
(with a timeout) until a newer epoch is committed: a standby or an agent follows the view by
watching, not by polling. Each host agent registers its host under a lease it keeps alive;
a host whose agent stops renewing (dead, partitioned away) drops out of `hosts()` when the
lease runs out: the slow, authoritative signal of a lost host (the fast ones are the data
plane's).

etcd is reached through its JSON gateway (`/v3/...`, base64 keys and values) with httpx: no
gRPC stack, every call bounded by `timeout_s`, and the endpoints tried in turn (an etcd client
talks to one endpoint; failing over to the next member is the caller's job). With
`credentials` (user, password: from the cluster secret, `ClusterSecret.etcd_credentials`) the
store authenticates to each member it talks to (`/v3/auth/authenticate`; a member's token is
its own, and runs out) and sends the token with every call; an etcd user of one instance
reads and writes that instance's keys only (`eep.membership.etcd_auth`).
"""

from __future__ import annotations

import abc
import base64
import contextlib
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from eep.errors import MembershipError

logger = logging.getLogger(__name__)


class StoreError(MembershipError):
    """The store cannot be reached or answered out of its protocol."""


class EpochConflict(MembershipError):
    """A commit from an epoch that is no longer current (another controller committed first)."""

    def __init__(self, expected: int | None, found: int | None) -> None:
        super().__init__(f"commit from epoch {expected} refused: the current epoch is {found}")
        self.expected, self.found = expected, found


class LeaseLost(MembershipError):
    """A host's lease ran out (or was revoked) before it was renewed: the host is out."""


class NotLeader(MembershipError):
    """Another head holds the instance's leader key, or this head's hold on it ran out: this
    head may not commit."""


@dataclass(frozen=True, slots=True)
class Committed:
    """A committed membership record: its epoch and the JSON-able view (and placement)."""

    epoch: int
    record: dict[str, Any]


class HostLease(abc.ABC):
    """A host's registration, alive while renewed within its TTL."""

    ttl_s: float

    @abc.abstractmethod
    def keep_alive(self) -> None:
        """Renew for another TTL; raises LeaseLost if it already ran out."""

    @abc.abstractmethod
    def revoke(self) -> None:
        """Leave at once (a clean shutdown)."""


class MembershipStore(abc.ABC):
    @abc.abstractmethod
    def current(self) -> Committed | None:
        """The record committed last, or None before the first commit."""

    @abc.abstractmethod
    def commit(self, expected_epoch: int | None, committed: Committed) -> None:
        """Make `committed` current iff the current epoch is `expected_epoch` (None: nothing
        committed yet) and `committed.epoch` is newer, or is `expected_epoch` itself and the
        current record is this store's own last commit (a view changed within its epoch: a
        joiner that started loading or failed); else raise EpochConflict. Safe to call again
        after a StoreError: a commit of this store's that went through while its answer was
        lost counts as done, never as a conflict and never as a second commit."""

    @abc.abstractmethod
    def wait_newer(self, epoch: int, timeout_s: float) -> Committed | None:
        """The current record once its epoch is newer than `epoch`, or None after `timeout_s`."""

    @abc.abstractmethod
    def register_host(self, host: str, info: dict[str, Any], ttl_s: float) -> HostLease:
        """List `host` with `info` in `hosts()` while its lease is kept alive."""

    @abc.abstractmethod
    def hosts(self) -> dict[str, dict[str, Any]]:
        """Every host whose lease is alive, with its info."""

    @abc.abstractmethod
    def campaign(self, head: str, info: dict[str, Any], ttl_s: float) -> HostLease:
        """Become the instance's head: hold its leader key under a lease of `ttl_s`, kept alive
        as a host's is (`keep_alive` raises LeaseLost once it ran out, NotLeader if the key was
        taken meanwhile). NotLeader if another head holds the key. From then on every `commit` of this store checks, in the same transaction
        as the epoch, that the key is still the one it made: a head whose lease ran out (cut off,
        stalled) can never commit again (NotLeader), even where its epoch is still current."""

    @abc.abstractmethod
    def leader(self) -> dict[str, Any] | None:
        """The head holding the leader key (`head`, `info`), or None."""

    def close(self) -> None:  # noqa: B027 (nothing to release by default)
        """Release connections."""


class HostRegistration:
    """Keeps `host` listed in `store.hosts()` from a thread of its own: renews the lease every
    third of its TTL and registers the host anew when the lease ran out (the store was out of
    reach for longer than the TTL). The listing is the slow record for operators and a standby
    head, not a liveness signal of the instance: an etcd outage, however long, neither stalls
    the host that owns this (its heartbeats go on) nor ends it. The first registration happens
    in the constructor, so a store unreachable at start-up raises there."""

    def __init__(self, store: MembershipStore, host: str, info: dict[str, Any], ttl_s: float) -> None:
        self.store, self.host, self.info, self.ttl_s = store, host, dict(info), ttl_s
        self.registrations = 1
        self._lease: HostLease | None = store.register_host(host, self.info, ttl_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{host}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = self.ttl_s / 3
        while not self._stop.wait(wait):
            wait = self.ttl_s / 3
            try:
                if self._lease is None:
                    self._lease = self.store.register_host(self.host, self.info, self.ttl_s)
                    self.registrations += 1
                    logger.warning("host %s registered again (registration %d)", self.host, self.registrations)
                else:
                    self._lease.keep_alive()
            except LeaseLost as e:
                logger.warning("%s: registering the host again", e)
                self._lease, wait = None, 0.0
            except StoreError as e:
                logger.warning("host %s: lease not renewed: %s", self.host, e)
                wait = min(self.ttl_s / 6, 0.5)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop renewing and leave the listing at once (where the store answers; else the lease
        ends at its TTL)."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._lease is not None and not self._thread.is_alive():
            with contextlib.suppress(MembershipError):
                self._lease.revoke()
        self._lease = None


def _check_commit(expected: int | None, committed: Committed) -> None:
    if expected is not None and committed.epoch < expected:
        raise MembershipError(f"epoch {committed.epoch} is older than {expected}")


# -- one host ---------------------------------------------------------------------------------
_LEADER = "\0leader"  # the memory store keeps its leader key among the host leases, under a name no host has


class _MemoryLease(HostLease):
    def __init__(self, store: MemoryStore, host: str, ttl_s: float) -> None:
        self.store, self.host, self.ttl_s = store, host, ttl_s

    def keep_alive(self) -> None:
        with self.store._cond:
            entry = self.store._hosts.get(self.host)
            if entry is None or entry[0] is not self or entry[1] <= time.monotonic():
                raise LeaseLost(f"the lease of host {self.host} ran out")
            self.store._hosts[self.host] = (self, time.monotonic() + self.ttl_s, entry[2])

    def revoke(self) -> None:
        with self.store._cond:
            entry = self.store._hosts.get(self.host)
            if entry is not None and entry[0] is self:
                del self.store._hosts[self.host]


class MemoryStore(MembershipStore):
    """The store of a single-host instance: the controller's own memory."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._current: Committed | None = None
        self._hosts: dict[str, tuple[_MemoryLease, float, dict[str, Any]]] = {}
        self._leading: _MemoryLease | None = None  # the leader key this store made (`campaign`)

    def current(self) -> Committed | None:
        with self._cond:
            return self._current

    def commit(self, expected_epoch: int | None, committed: Committed) -> None:
        _check_commit(expected_epoch, committed)
        with self._cond:
            if self._leading is not None and self._leader_entry() is not self._leading:
                raise NotLeader(f"this head's hold on the leader key ran out ({self._leading.host})")
            found = None if self._current is None else self._current.epoch
            if found != expected_epoch:  # one process's store: its current record is its own
                raise EpochConflict(expected_epoch, found)
            self._current = Committed(committed.epoch, json.loads(json.dumps(committed.record)))
            self._cond.notify_all()

    def wait_newer(self, epoch: int, timeout_s: float) -> Committed | None:
        with self._cond:
            self._cond.wait_for(lambda: self._current is not None and self._current.epoch > epoch, timeout_s)
            cur = self._current
            return cur if cur is not None and cur.epoch > epoch else None

    def register_host(self, host: str, info: dict[str, Any], ttl_s: float) -> HostLease:
        lease = _MemoryLease(self, host, ttl_s)
        with self._cond:
            self._hosts[host] = (lease, time.monotonic() + ttl_s, dict(info))
        return lease

    def hosts(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        with self._cond:
            return {h: dict(info) for h, (_, until, info) in self._hosts.items()
                    if until > now and h != _LEADER}

    def _leader_entry(self) -> _MemoryLease | None:
        entry = self._hosts.get(_LEADER)
        return entry[0] if entry is not None and entry[1] > time.monotonic() else None

    def campaign(self, head: str, info: dict[str, Any], ttl_s: float) -> HostLease:
        with self._cond:
            if self._leader_entry() is not None:
                raise NotLeader(f"head {self._hosts[_LEADER][2]['head']!r} leads this instance")
            lease = _MemoryLease(self, _LEADER, ttl_s)
            self._hosts[_LEADER] = (lease, time.monotonic() + ttl_s, {"head": head, "info": dict(info)})
            self._leading = lease
            return lease

    def leader(self) -> dict[str, Any] | None:
        with self._cond:
            return dict(self._hosts[_LEADER][2]) if self._leader_entry() is not None else None


# -- across hosts -----------------------------------------------------------------------------
def _token_refused(resp: httpx.Response) -> bool:
    """etcd refused the token we sent (it expired, or is another member's), not the request."""
    text = resp.text
    return resp.status_code in (400, 401) and ("invalid auth token" in text or "user name is empty" in text)


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def _prefix_end(prefix: str) -> str:
    """The first key after every key that starts with `prefix` (etcd's range_end)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


class _EtcdLease(HostLease):
    def __init__(self, store: EtcdStore, host: str, lease_id: str, ttl_s: float) -> None:
        self.store, self.host, self.id, self.ttl_s = store, host, lease_id, ttl_s

    def keep_alive(self) -> None:
        reply = self.store._call("/v3/lease/keepalive", {"ID": self.id})
        if int(reply.get("result", reply).get("TTL", 0)) <= 0:
            raise LeaseLost(f"the lease of host {self.host} ran out")

    def revoke(self) -> None:
        self.store._call("/v3/lease/revoke", {"ID": self.id})


class _EtcdLeaderLease(_EtcdLease):
    """The leader key's lease: renewing it also checks that the key is still the one this head
    made (it may have been taken over while the lease lived: NotLeader)."""

    def keep_alive(self) -> None:
        super().keep_alive()
        if self.store._leader_create_revision() != self.store._leader_revision:
            raise NotLeader(f"the leader key is no longer {self.host}'s; {self.store._leader_name()} leads now")


class EtcdStore(MembershipStore):
    """The store of a multi-host instance, in etcd under `/eep/{instance}/`: `epoch` (the
    committed epoch, decimal), `view` (the record, JSON), `hosts/{host}` (each under its
    host's lease) and `leader` (the head's, under its lease: `campaign`)."""

    def __init__(self, endpoints: list[str] | str, instance: str = "default", *, timeout_s: float = 2.0,
                 credentials: tuple[str, str] | None = None) -> None:
        self.endpoints = [e.rstrip("/") for e in (endpoints.split(",") if isinstance(endpoints, str) else endpoints)]
        if not self.endpoints:
            raise StoreError("no etcd endpoint given")
        self.timeout_s = timeout_s
        self._prefix = f"/eep/{instance}/"
        self._writer = uuid.uuid4().hex  # in every record this store commits: a retry knows its own commit
        self._last_revision: int | None = None  # the view key's revision after this store's last commit
        self._leader_revision: int | None = None  # the create revision of the leader key it made (`campaign`)
        self._good = 0  # the endpoint that answered last
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s))
        self._credentials = credentials
        self._tokens: dict[str, str | None] = {}  # endpoint -> its token (None: its auth is off)
        self._lock = threading.Lock()  # the agent's lease thread and its main thread share a store

    def close(self) -> None:
        self._http.close()

    def _headers(self, endpoint: str, fresh: bool = False) -> dict[str, str]:
        """The token for `endpoint` (authenticating to it first if need be)."""
        if self._credentials is None:
            return {}
        with self._lock:
            if fresh or endpoint not in self._tokens:
                self._tokens[endpoint] = self._authenticate(endpoint)
            token = self._tokens[endpoint]
        return {"Authorization": token} if token else {}

    def _authenticate(self, endpoint: str) -> str | None:
        assert self._credentials is not None
        user, password = self._credentials
        resp = self._http.post(endpoint + "/v3/auth/authenticate", json={"name": user, "password": password})
        if resp.status_code == 200:
            return str(resp.json()["token"])
        if "authentication is not enabled" in resp.text:
            logger.warning("etcd %s has authentication disabled: anyone who reaches it can read and commit this "
                           "instance's membership (enable it: docs/security.md)", endpoint)
            return None
        raise StoreError(f"etcd {endpoint} refused user {user!r}: {resp.text[:200]} (is the instance's etcd user "
                         f"made with this cluster secret? `eep secret etcd-grant`)")

    # every call: the endpoint that answered last first, then the others in turn
    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for k in range(len(self.endpoints)):
            i = (self._good + k) % len(self.endpoints)
            endpoint = self.endpoints[i]
            try:
                resp = self._http.post(endpoint + path, json=body, headers=self._headers(endpoint))
                if resp.status_code != 200 and _token_refused(resp):  # ran out, or another member's
                    resp = self._http.post(endpoint + path, json=body, headers=self._headers(endpoint, fresh=True))
            except httpx.HTTPError as e:
                errors.append(f"{endpoint}: {e.__class__.__name__}")
                continue
            if resp.status_code != 200:
                raise StoreError(f"etcd {endpoint}{path} answered {resp.status_code}: {resp.text[:300]}")
            self._good = i
            return resp.json()  # type: ignore[no-any-return]
        raise StoreError(f"no etcd endpoint answered {path} within {self.timeout_s:g} s: {'; '.join(errors)}")

    def _get(self, key: str) -> tuple[bytes | None, int]:
        """(value or None, the store's revision)."""
        reply = self._call("/v3/kv/range", {"key": _b64(self._prefix + key)})
        kvs = reply.get("kvs") or []
        return (_unb64(kvs[0].get("value", "")) if kvs else None), int(reply["header"]["revision"])

    def current(self) -> Committed | None:
        return self._current()[0]

    def _current(self) -> tuple[Committed | None, int]:
        raw, revision = self._get("view")
        if raw is None:
            return None, revision
        data = json.loads(raw)
        return Committed(int(data["epoch"]), data["record"]), revision

    def commit(self, expected_epoch: int | None, committed: Committed) -> None:
        _check_commit(expected_epoch, committed)
        epoch_key = _b64(self._prefix + "epoch")
        guard = ({"key": epoch_key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                 if expected_epoch is None else
                 {"key": epoch_key, "target": "VALUE", "result": "EQUAL", "value": _b64(str(expected_epoch))})
        compare = [guard]
        leading = self._leader_revision  # (the renewing thread may take the key again meanwhile)
        if leading is not None:  # a head commits only while the leader key is still its own
            compare.append({"key": _b64(self._prefix + "leader"), "target": "CREATE", "result": "EQUAL",
                            "create_revision": str(leading)})
        if committed.epoch == expected_epoch:  # a change within the epoch: only over our own last commit
            if self._last_revision is None:
                raise EpochConflict(expected_epoch, expected_epoch)
            compare.append({"key": _b64(self._prefix + "view"), "target": "MOD", "result": "EQUAL",
                            "mod_revision": str(self._last_revision)})
        value = json.dumps({"epoch": committed.epoch, "record": committed.record, "writer": self._writer})
        reply = self._call("/v3/kv/txn", {
            "compare": compare,
            "success": [
                {"request_put": {"key": epoch_key, "value": _b64(str(committed.epoch))}},
                {"request_put": {"key": _b64(self._prefix + "view"), "value": _b64(value)}},
            ],
        })
        if reply.get("succeeded", False):
            self._last_revision = int(reply["header"]["revision"])
            return
        kvs = self._call("/v3/kv/range", {"key": _b64(self._prefix + "view")}).get("kvs") or []
        found = json.loads(_unb64(kvs[0].get("value", ""))) if kvs else None
        if found is not None and found.get("writer") == self._writer and found["epoch"] == committed.epoch \
                and found["record"] == json.loads(json.dumps(committed.record)):
            # this very commit went through on an earlier try whose answer was lost (a member
            # that applied it and went silent, a connection cut): it is done, once
            logger.info("etcd: the commit of epoch %d had gone through; its answer was lost", committed.epoch)
            self._last_revision = int(kvs[0]["mod_revision"])
            return
        if leading is not None and self._leader_create_revision() != leading:
            raise NotLeader(f"this head's leader key is gone (its lease ran out); {self._leader_name()} leads now")
        raise EpochConflict(expected_epoch, None if found is None else int(found["epoch"]))

    def wait_newer(self, epoch: int, timeout_s: float) -> Committed | None:
        deadline = time.monotonic() + timeout_s
        while True:
            cur, revision = self._current()
            if cur is not None and cur.epoch > epoch:
                return cur
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._watch_once(revision + 1, left)

    def _watch_once(self, start_revision: int, timeout_s: float) -> None:
        """Block until the view key changes at or after `start_revision`, or `timeout_s`."""
        body = {"create_request": {"key": _b64(self._prefix + "view"), "start_revision": str(start_revision)}}
        timeout = httpx.Timeout(self.timeout_s, read=timeout_s)
        endpoint = self.endpoints[self._good]
        try:
            headers = self._headers(endpoint)
            with self._http.stream("POST", endpoint + "/v3/watch", json=body, timeout=timeout,
                                   headers=headers) as resp:
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result", {})
                    if result.get("events"):
                        return
                    if result.get("canceled"):  # refused (a token that ran out): the next call authenticates
                        with self._lock:
                            self._tokens.pop(endpoint, None)
                        time.sleep(min(0.05, timeout_s))
                        return
        except httpx.ReadTimeout:
            return
        except httpx.HTTPError as e:  # this member is gone: the next call tries the others
            logger.info("etcd watch on %s ended: %s", endpoint, e.__class__.__name__)
            self._good = (self._good + 1) % len(self.endpoints)
            time.sleep(min(0.05, timeout_s))

    def register_host(self, host: str, info: dict[str, Any], ttl_s: float) -> HostLease:
        grant = self._call("/v3/lease/grant", {"TTL": str(max(1, math.ceil(ttl_s)))})
        lease_id = str(grant["ID"])
        self._call("/v3/kv/put", {"key": _b64(self._prefix + "hosts/" + host), "value": _b64(json.dumps(info)),
                                  "lease": lease_id})
        return _EtcdLease(self, host, lease_id, ttl_s)

    def campaign(self, head: str, info: dict[str, Any], ttl_s: float) -> HostLease:
        grant = self._call("/v3/lease/grant", {"TTL": str(max(1, math.ceil(ttl_s)))})
        lease_id, key = str(grant["ID"]), _b64(self._prefix + "leader")
        value = json.dumps({"head": head, "info": info, "writer": self._writer, "lease": lease_id})
        try:
            reply = self._call("/v3/kv/txn", {
                "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                "success": [{"request_put": {"key": key, "value": _b64(value), "lease": lease_id}}],
            })
            won = bool(reply.get("succeeded", False))
            revision = int(reply["header"]["revision"]) if won else None  # the put's: the key's create revision
        except StoreError:  # the answer may be what was lost: the key says whether the put went through
            won, revision = False, None
        if not won:
            # the key may be this store's own, from an earlier campaign whose answer was lost
            kv = self._leader_kv()
            held = json.loads(_unb64(kv.get("value", ""))) if kv is not None else {}
            with contextlib.suppress(StoreError):
                if held.get("lease") != lease_id:
                    self._call("/v3/lease/revoke", {"ID": lease_id})
            if kv is None or held.get("writer") != self._writer:
                raise NotLeader(f"{self._leader_name()} leads this instance")
            lease_id, revision = str(held["lease"]), int(kv["create_revision"])
            logger.info("etcd: the leader key was already this head's (an earlier answer was lost)")
        self._leader_revision = revision
        return _EtcdLeaderLease(self, f"head {head}", lease_id, ttl_s)

    def _leader_kv(self) -> dict[str, Any] | None:
        kvs = self._call("/v3/kv/range", {"key": _b64(self._prefix + "leader")}).get("kvs") or []
        return kvs[0] if kvs else None

    def _leader_create_revision(self) -> int | None:
        kv = self._leader_kv()
        return int(kv["create_revision"]) if kv is not None else None

    def _leader_name(self) -> str:
        holder = self.leader()
        return f"head {holder['head']!r}" if holder is not None else "no head"

    def leader(self) -> dict[str, Any] | None:
        kv = self._leader_kv()
        if kv is None:
            return None
        data = json.loads(_unb64(kv.get("value", "")))
        return {"head": data["head"], "info": data["info"]}

    def hosts(self) -> dict[str, dict[str, Any]]:
        prefix = self._prefix + "hosts/"
        reply = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return {_unb64(kv["key"]).decode()[len(prefix):]: json.loads(_unb64(kv.get("value", "")))
                for kv in reply.get("kvs") or []}
