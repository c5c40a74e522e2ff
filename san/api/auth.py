"""Who may use the management API: a bearer token that only root (the server's user) can read, checked on every
request but the OpenAPI document; binding beyond loopback needs TLS.

The server keeps its token in DATA/api-token and publishes it for local clients in the runtime directory
(/run/san, or $SAN_RUNTIME_DIR), one file per API address; the CLI finds it there for the address it talks to."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import socket
import stat
import sys
from urllib.parse import urlsplit

from san.api.asgi import ASGIApp, Receive, Scope, Send, answer
from san.model import printable
from san.throttle import Throttle

log = logging.getLogger("san.api")
TOKEN_NAME = "api-token"
METRICS_TOKEN = "metrics-token"  # a gateway's, in its cluster directory: what Prometheus sends to its /metrics
PUBLIC_PATHS = frozenset({"/openapi.json"})


class AuthSetupError(Exception):
    """The token or the listening address cannot be set up safely; the message is the one line to show."""


def runtime_dir() -> str:
    """Where servers publish their tokens: $SAN_RUNTIME_DIR, /run/san for root, else the user's runtime directory."""
    if os.environ.get("SAN_RUNTIME_DIR"):
        return os.environ["SAN_RUNTIME_DIR"]
    if os.geteuid() == 0:
        return "/run/san"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "san") if xdg else f"/tmp/san-{os.geteuid()}"


def runtime_token_path(host: str, port: int) -> str:
    """Where the token of the API at host:port is published for local clients."""
    return os.path.join(runtime_dir(), f"api-{host}-{port}.token")


def token_path_for_url(url: str) -> str | None:
    """Where a server listening at the host and port of an API URL (as the CLI is given it) published its token."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.hostname is None:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return runtime_token_path(parts.hostname, port)


def published_names(host: str) -> list[str]:
    """The hosts a server bound to host publishes its token under: the host, and for a wildcard the loopback
    address a local client uses to reach it."""
    names = {"0.0.0.0": ["0.0.0.0", "127.0.0.1"], "::": ["::", "::1", "127.0.0.1"]}.get(host, [host])
    local = {"127.0.0.1", "::1", "0.0.0.0", "::"}
    return [*names, "localhost"] if host in local else names


def listener_uids(address: str, port: int) -> set[int]:
    """The uids owning the TCP sockets that may accept connections to address:port on this machine, from
    /proc/net/tcp and tcp6 (sockets bound to the address itself, else the wildcard ones; an IPv4 address is also
    reached by a dual-stack [::] socket or one bound to its ::ffff: form); empty when there is none."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return set()
    forms: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = {ip}
    if isinstance(ip, ipaddress.IPv4Address):
        forms.add(ipaddress.IPv6Address(f"::ffff:{ip}"))
    exact: set[int] = set()
    wildcard: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != "0A":  # LISTEN
                continue
            local, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) != port:
                continue
            bound = _proc_address(local)
            if bound in forms:
                exact.add(int(fields[7]))
            elif bound.is_unspecified and (bound.version == ip.version or table.endswith("6")):
                wildcard.add(int(fields[7]))
    return exact or wildcard


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp* prints it: 32-bit words in the machine's byte order."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def is_loopback(host: str) -> bool:
    """Whether every address host resolves to is a loopback address (an empty host means every interface)."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def check_listen(host: str, tls: bool) -> None:
    """The API is served beyond loopback only with TLS (the token would cross the network in the clear)."""
    if not tls and not is_loopback(host):
        raise AuthSetupError(
            f"refusing to serve the management API on {host or '*'} without TLS: give --api-cert and --api-key, "
            "or bind it to 127.0.0.1"
        )


def load_token(data_dir: str, token_file: str | None = None, name: str = TOKEN_NAME) -> str:
    """The API token: from token_file, else DATA/api-token (made on first start: 256 random bits, mode 0600);
    name makes it another token kept the same way (a gateway's metrics token)."""
    path = token_file or os.path.join(data_dir, name)
    if token_file is None and not os.path.lexists(path):
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        return token
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_NOFOLLOW if token_file is None else 0))
    except OSError as exc:
        raise AuthSetupError(f"cannot read the API token {path}: {exc.strerror}") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise AuthSetupError(f"{path} must be a regular file of uid {os.geteuid()} with mode 0600 (it holds the API token)")
        token = f.read(4096).strip()
    if len(token) < 16:
        raise AuthSetupError(f"the API token in {path} is too short (at least 16 characters)")
    return token


def publish(token: str, host: str, port: int) -> list[str]:
    """Put the token where local clients of host:port find it; the files written (none when the runtime directory
    is not safe to write: then clients need --token-file)."""
    directory = runtime_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            log.warning("not publishing the API token: %s is not a private directory of uid %d", directory, os.geteuid())
            return []
        written = []
        for name in published_names(host):
            path = runtime_token_path(name, port)
            temporary = f"{path}.{os.getpid()}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            os.replace(temporary, path)
            written.append(path)
        return written
    except OSError as exc:
        log.warning("not publishing the API token in %s: %s", directory, exc.strerror)
        return []


def unpublish(paths: list[str], token: str) -> None:
    """Remove published token files that still hold this server's token."""
    for path in paths:
        try:
            with open(path) as f:
                if f.read().strip() == token:
                    os.unlink(path)
        except OSError:
            pass


def read_client_token(path: str, follow: bool = False) -> tuple[str, int] | None:
    """A token for the CLI from a file, and the uid that owns the file (None when it cannot be read, as for a user
    who is not root). A published file is never a link; one the user names may be (a mounted secret)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    except OSError:
        return None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            token = f.read(4096).strip()
        except (OSError, UnicodeDecodeError):
            return None
    return (token, st.st_uid) if token else None


class BearerAuth:
    """ASGI middleware: every HTTP request but the public paths needs `Authorization: Bearer <token>`. Refusals
    are logged once a minute per client address."""

    def __init__(self, app: ASGIApp, token: str, metrics_token: str | None = None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        # What Prometheus holds may read /metrics and nothing else (not the hosts' secrets the admin token reads).
        self.metrics_only = f"Bearer {metrics_token}".encode() if metrics_token else None
        self.throttle = Throttle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (scope["type"] == "http" and scope["path"] in PUBLIC_PATHS):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        given = dict(scope.get("headers") or ()).get(b"authorization", b"")
        metrics = self.metrics_only is not None and scope["path"] == "/metrics" and scope.get("method") == "GET"
        if hmac.compare_digest(given, self.expected) or (metrics and hmac.compare_digest(given, self.metrics_only or b"")):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        self._log(client[0] if client else "a Unix socket")
        message = "authentication required: this API needs its token (run as root on the server, or give --token-file)"
        await answer(send, 401, message, [(b"www-authenticate", b'Bearer realm="san"')])

    def _log(self, address: str) -> None:
        if self.throttle.ready(address):
            log.warning("refused API requests from %s without a valid token", printable(address))
