"""The HTTP/JSON transport under the typed client (stdlib only: the CLI must start fast).

It sends the API token (from --token-file, SAN_TOKEN_FILE, or the file the server published for that address),
never through a proxy or a redirect, and on this machine only to a listener owned by the token file's owner;
it verifies TLS against --ca-file. Errors come back as ApiError with the server's one-line message."""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from san.api.auth import listener_uids, read_client_token, token_path_for_url
from san.client.errors import ApiError, error_for

DEFAULT_API = "http://127.0.0.1:8080"


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the token elsewhere: refuse it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("the API answered with a redirect; not following it")


class Transport:
    """Requests to one API (or metrics listener) with its token; errors come back as ApiError subclasses."""

    def __init__(self, base: str, token_file: str | None = None, ca_file: str | None = None) -> None:
        self.base = base if "://" in base else f"http://{base}"
        self.base = self.base.rstrip("/")
        self.context: ssl.SSLContext | None = None
        if self.base.startswith("https://"):
            try:
                self.context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ApiError(f"cannot load the CA certificate {ca_file}: {exc}") from None
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}), NoRedirects()]
        if self.context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.context))
        self.opener = urllib.request.build_opener(*handlers)
        self.token = self._token(token_file)

    def _token(self, token_file: str | None) -> str | None:
        path = token_file if token_file is not None else token_path_for_url(self.base)
        found = read_client_token(path, follow=token_file is not None) if path is not None else None
        if found is None:
            if token_file is not None:
                raise ApiError(f"cannot read the API token file {token_file}")
            return None
        token, owner = found
        self._check_listener(owner)
        return token

    def _check_listener(self, owner: int) -> None:
        """On this machine, the port the token goes to must be held by root or by the user who owns the token file:
        after a crash another user could listen there to collect it."""
        parts = urlsplit(self.base)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)}
        except (OSError, ValueError):
            return
        for address in addresses:
            if not ipaddress.ip_address(str(address).split("%")[0]).is_loopback:
                continue
            strangers = listener_uids(str(address), port) - {owner, 0}
            if strangers:
                raise ApiError(
                    f"{address}:{port} is held by uid {min(strangers)}, not by the san server: not sending it the token"
                )

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        payload = self._send(method, path, body)
        try:
            return json.loads(payload) if payload else None
        except ValueError:
            raise ApiError(f"the san API at {self.base} answered something that is not JSON") from None

    def text(self, path: str) -> str:
        """GET a resource that is text, not JSON (/metrics)."""
        try:
            return self._send("GET", path, None).decode()
        except UnicodeDecodeError:
            raise ApiError(f"{self.base}{path} answered something that is not text") from None

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self.opener.open(request, timeout=600) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error") or exc.reason
            except (ValueError, AttributeError):
                message = exc.reason
            if exc.code == 401 and self.token is None:
                message = (
                    f"the API at {self.base} needs its token, and none was found for this address: run as root on the "
                    "server, or give --token-file FILE (the server's DATA/api-token)"
                )
            raise error_for(exc.code, str(message)) from None
        except http.client.HTTPException:  # an answer that is not HTTP (BadStatusLine), or none (RemoteDisconnected)
            raise ApiError(f"{self.base} does not answer as the san API (is it another port, like iSCSI's?)") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"cannot reach the san API at {self.base}: {reason}") from None
        return bytes(payload)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
