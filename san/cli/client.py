"""A small HTTP/JSON client for the management API, for the CLI (stdlib only: it must start fast).

It sends the API token (from --token-file, SAN_TOKEN_FILE, or the file the server published for that address) and
verifies TLS against --ca-file; errors come back as ApiError with the server's one-line message."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from san.api.auth import read_client_token, token_paths_for_url

DEFAULT_API = "http://127.0.0.1:8080"


class ApiError(Exception):
    """The API refused a request, or could not be reached; str() is the line to show."""


class Client:
    def __init__(self, base: str, token_file: str | None = None, ca_file: str | None = None) -> None:
        self.base = base if "://" in base else f"http://{base}"
        self.base = self.base.rstrip("/")
        self.token = self._token(token_file)
        self.context: ssl.SSLContext | None = None
        if self.base.startswith("https://"):
            try:
                self.context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ApiError(f"cannot load the CA certificate {ca_file}: {exc}") from None

    def _token(self, token_file: str | None) -> str | None:
        if token_file is not None:
            token = read_client_token(token_file)
            if token is None:
                raise ApiError(f"cannot read the API token file {token_file}")
            return token
        for path in token_paths_for_url(self.base):
            token = read_client_token(path)
            if token is not None:
                return token
        return None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=600, context=self.context) as response:
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
            raise ApiError(str(message)) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"cannot reach the san API at {self.base}: {reason}") from None
        try:
            return json.loads(payload) if payload else None
        except ValueError:
            raise ApiError(f"the san API at {self.base} answered something that is not JSON") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
