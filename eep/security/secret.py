"""The cluster credential: one secret file shared by every host of a multi-host instance.

What this module promises:
- `ClusterSecret.load(path)` reads a secret of at least 32 bytes from a file that is a regular
  file owned by the user running eep and readable by no one else (mode 0600 or stricter);
  anything else is a `ConfigError` that says what to do. `init_secret_file(path)` writes a
  fresh one (32 random bytes as 64 hex digits, mode 0600, never over an existing file).
- Every key eep uses between hosts is derived from it, one per purpose (HMAC-SHA256 of a
  label): the control connections' handshake key, the ZeroMQ CURVE key pairs of the data
  plane and the expert backups, the etcd password of an instance. A key of one purpose says
  nothing about another's.
- The secret never appears in a repr, a log line or an exception message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from eep.errors import ConfigError

MIN_SECRET_BYTES = 32
_HOW = "make one with `eep secret init PATH` and copy it to every host (mode 0600)"


class ClusterSecret:
    """The instance's shared secret (bytes kept private); derive keys with `key(purpose)`."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) < MIN_SECRET_BYTES:
            raise ConfigError(f"a cluster secret must be at least {MIN_SECRET_BYTES} bytes; {_HOW}")
        self._key = key

    def __repr__(self) -> str:
        return "ClusterSecret(<hidden>)"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClusterSecret:
        """The secret in `path`, after checking who may read it (see the module docstring)."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(f"cluster secret file {p} does not exist; {_HOW}") from None
        except OSError as e:
            raise ConfigError(f"cannot open cluster secret file {p}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"cluster secret file {p} is not a regular file")
            if st.st_uid != os.geteuid():
                raise ConfigError(f"cluster secret file {p} belongs to uid {st.st_uid}, not to this user "
                                  f"(uid {os.geteuid()}): chown it")
            if st.st_mode & 0o077:
                raise ConfigError(f"cluster secret file {p} has mode {stat.S_IMODE(st.st_mode):04o}: others may read "
                                  f"it; run `chmod 600 {p}`")
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        key = raw.rstrip(b"\r\n")
        if len(key) < MIN_SECRET_BYTES:
            raise ConfigError(f"cluster secret file {p} holds {len(key)} bytes, fewer than {MIN_SECRET_BYTES}; {_HOW}")
        return cls(key)

    @property
    def raw(self) -> bytes:
        """The secret itself: only for handing to a process of this host, over a pipe or a
        socketpair its host made (a rank started by it), never to the network."""
        return self._key

    def key(self, purpose: str) -> bytes:
        """32 bytes for `purpose` (a fixed label such as "control handshake")."""
        return hmac.new(self._key, b"eep v1 " + purpose.encode(), hashlib.sha256).digest()

    def etcd_credentials(self, instance: str) -> tuple[str, str]:
        """The etcd user and password of `instance` (a user of its own per instance)."""
        return f"eep-{instance}", self.key(f"etcd password {instance}").hex()


def init_secret_file(path: str | os.PathLike[str]) -> Path:
    """Write a fresh secret to `path` (mode 0600, created: an existing file is never replaced)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(f"{p} exists; remove it first if a new secret is meant (every host needs the new one)") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, secrets.token_hex(MIN_SECRET_BYTES).encode() + b"\n")
    finally:
        os.close(fd)
    return p
