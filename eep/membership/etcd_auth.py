"""etcd users for eep instances: one user and one role per instance, on its key prefix only.

`enable_auth(endpoint, root_password)` turns etcd's authentication on (it makes the `root`
user etcd requires first); `grant_instance(endpoint, root_password, instance, secret)` makes
the instance's user (`ClusterSecret.etcd_credentials`: its password derives from the cluster
secret, so every host of the instance has it and no file more is needed) with read and write
on `/eep/{instance}/` and nothing else. Both are idempotent. The test bed runs them on every
etcd it starts; an operator runs them once (`eep secret etcd-grant`).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import httpx

from eep.membership.store import StoreError
from eep.security.secret import ClusterSecret

logger = logging.getLogger(__name__)


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


class _Admin:
    def __init__(self, endpoint: str, root_password: str, timeout_s: float) -> None:
        self.endpoint, self.root_password = endpoint.rstrip("/"), root_password
        self.http = httpx.Client(timeout=timeout_s)
        self.headers: dict[str, str] = {}

    def call(self, path: str, body: dict[str, Any], ok_if: tuple[str, ...] = ()) -> dict[str, Any]:
        resp = self.http.post(self.endpoint + path, json=body, headers=self.headers)
        if resp.status_code != 200:
            if any(text in resp.text for text in ok_if):
                return {}
            raise StoreError(f"etcd {self.endpoint}{path} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()  # type: ignore[no-any-return]

    def login(self) -> None:
        resp = self.http.post(self.endpoint + "/v3/auth/authenticate", json={"name": "root", "password": self.root_password})
        if resp.status_code == 200:
            self.headers = {"Authorization": str(resp.json()["token"])}
        elif "authentication is not enabled" not in resp.text:
            raise StoreError(f"etcd {self.endpoint} refused root: {resp.text[:200]}")

    def close(self) -> None:
        self.http.close()


def enable_auth(endpoint: str, root_password: str, *, timeout_s: float = 5.0) -> None:
    """Authentication on, with a `root` user of `root_password` (kept if it exists)."""
    admin = _Admin(endpoint, root_password, timeout_s)
    try:
        admin.login()
        if admin.headers:
            return  # already on
        admin.call("/v3/auth/user/add", {"name": "root", "password": root_password}, ok_if=("user name already exists",))
        admin.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        admin.call("/v3/auth/enable", {})
        logger.info("etcd %s: authentication enabled", endpoint)
    finally:
        admin.close()


def grant_instance(endpoint: str, root_password: str, instance: str, secret: ClusterSecret, *,
                   timeout_s: float = 5.0) -> str:
    """The instance's user and role (read and write on `/eep/{instance}/` only); its user name."""
    user, password = secret.etcd_credentials(instance)
    prefix = f"/eep/{instance}/"
    admin = _Admin(endpoint, root_password, timeout_s)
    try:
        admin.login()
        admin.call("/v3/auth/role/add", {"name": user}, ok_if=("role name already exists",))
        admin.call("/v3/auth/role/grant", {"name": user, "perm": {"permType": "READWRITE", "key": _b64(prefix),
                                                                  "range_end": _prefix_end(prefix)}})
        added = admin.call("/v3/auth/user/add", {"name": user, "password": password},
                           ok_if=("user name already exists",))
        if not added:  # it exists: its password follows this secret
            admin.call("/v3/auth/user/changepw", {"name": user, "password": password})
        admin.call("/v3/auth/user/grant", {"user": user, "role": user})
    finally:
        admin.close()
    logger.info("etcd %s: user %s may read and write %s", endpoint, user, prefix)
    return user
