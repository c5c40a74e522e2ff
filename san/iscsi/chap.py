"""CHAP (RFC 1994 with MD5, as RFC 7143 section 12.1.3 uses it): challenges, responses, one-way and mutual.

The target checks the initiator's CHAP_N/CHAP_R against its challenge, and answers a mutual challenge in turn."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass, field

CHALLENGE_BYTES = 16


class ChapError(ValueError):
    """The initiator's CHAP keys are missing, malformed or wrong."""


def response(identifier: int, secret: str, challenge: bytes) -> bytes:
    return hashlib.md5(bytes([identifier]) + secret.encode() + challenge).digest()


def parse_binary(value: str) -> bytes:
    """A CHAP binary value: 0x-hex or 0b-base64."""
    try:
        if value[:2] in ("0x", "0X"):
            return bytes.fromhex(value[2:])
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True)
    except (ValueError, binascii.Error):
        pass
    raise ChapError(f"CHAP value {value[:32]!r} is not 0x-hex or 0b-base64")


@dataclass
class Credentials:
    """What a host must prove (user, secret) and, for mutual CHAP, what the target proves back."""

    user: str
    secret: str
    mutual_user: str = ""
    mutual_secret: str = ""


@dataclass
class ChapExchange:
    """The target's side of one CHAP exchange."""

    credentials: Credentials
    identifier: int = field(default_factory=lambda: os.urandom(1)[0])
    challenge: bytes = field(default_factory=lambda: os.urandom(CHALLENGE_BYTES))

    def offer(self) -> list[tuple[str, str]]:
        return [("CHAP_A", "5"), ("CHAP_I", str(self.identifier)), ("CHAP_C", "0x" + self.challenge.hex())]

    def verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """Check CHAP_N/CHAP_R; with CHAP_I/CHAP_C from the initiator, the target's own answer for mutual CHAP."""
        if "CHAP_N" not in keys or "CHAP_R" not in keys:
            raise ChapError("CHAP_N and CHAP_R are required")
        expected = response(self.identifier, self.credentials.secret, self.challenge)
        if keys["CHAP_N"] != self.credentials.user or not hmac.compare_digest(parse_binary(keys["CHAP_R"]), expected):
            raise ChapError("CHAP authentication failed")
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            if self.credentials.mutual_user:
                raise ChapError("this host requires mutual CHAP")
            return []
        if not self.credentials.mutual_user:
            raise ChapError("mutual CHAP is not set up for this host")
        try:
            identifier = int(keys["CHAP_I"])
        except (KeyError, ValueError):
            raise ChapError("CHAP_I must be a number") from None
        challenge = parse_binary(keys.get("CHAP_C", ""))
        if not 0 <= identifier <= 255 or not challenge or challenge == self.challenge:
            raise ChapError("bad mutual CHAP challenge")
        answer = response(identifier, self.credentials.mutual_secret, challenge)
        return [("CHAP_N", self.credentials.mutual_user), ("CHAP_R", "0x" + answer.hex())]
