"""Text keys (RFC 7143 sections 6 and 13): parsing key=value data, and negotiating the operational keys.

Each key has a rule (list choice, boolean AND/OR, numeric min/max, declarative); a bad value is an error, not a crash."""

from __future__ import annotations

from dataclasses import dataclass

MAX_TEXT_BYTES = 64 * 1024


class NegotiationError(ValueError):
    """A text key or value the target cannot accept (the login fails with an initiator error)."""


def parse_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """key=value pairs from NUL-separated text; raises NegotiationError on malformed text."""
    raw = bytes(data)
    if len(raw) > MAX_TEXT_BYTES:
        raise NegotiationError("text too long")
    pairs: list[tuple[str, str]] = []
    for item in raw.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep or not key or len(key) > 63:
            raise NegotiationError(f"malformed text key {item[:64]!r}")
        try:
            pairs.append((key.decode("ascii"), value.decode("utf-8")))
        except UnicodeDecodeError:
            raise NegotiationError(f"text key {item[:64]!r} is not valid UTF-8") from None
    return pairs


def encode_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def parse_number(value: str, low: int, high: int) -> int:
    try:
        number = int(value, 16) if value.lower().startswith("0x") else int(value, 10)
    except ValueError:
        raise NegotiationError(f"{value!r} is not a number") from None
    if not low <= number <= high:
        raise NegotiationError(f"{number} is outside {low}..{high}")
    return number


def parse_bool(value: str) -> bool:
    if value not in ("Yes", "No"):
        raise NegotiationError(f"{value!r} is not Yes or No")
    return value == "Yes"


@dataclass
class Parameters:
    """The operational parameters of a session and connection, as negotiated (RFC 7143 defaults until then)."""

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_recv_data_segment_length: int = 8192  # what the initiator accepts: the most we put in one PDU
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    declared: bool = False  # whether our own MaxRecvDataSegmentLength has been declared to the initiator


# What the target offers for keys it negotiates.
TARGET_MAX_BURST = 1 << 20
TARGET_FIRST_BURST = 256 << 10
TARGET_MAX_RECV = 256 << 10
TARGET_MAX_OUTSTANDING_R2T = 16
DECLARED_BY_INITIATOR = frozenset({"InitiatorName", "InitiatorAlias", "SessionType", "TargetName"})
IRRELEVANT_IN_DISCOVERY = frozenset(
    {
        "MaxConnections",
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
    }
)


def negotiate(key: str, value: str, params: Parameters, discovery: bool) -> str | None:
    """Apply the initiator's offer of one operational key; the answer to send, or None for a declaration we do not answer."""
    if key in ("HeaderDigest", "DataDigest"):
        choices = value.split(",")
        for choice in choices:
            if choice not in ("CRC32C", "None"):
                continue
            if key == "HeaderDigest":
                params.header_digest = choice == "CRC32C"
            else:
                params.data_digest = choice == "CRC32C"
            return choice
        return "Reject"
    if discovery and key in IRRELEVANT_IN_DISCOVERY:
        return "Irrelevant"
    if key == "MaxConnections":
        parse_number(value, 1, 65535)
        params.max_connections = 1
        return "1"
    if key == "InitialR2T":
        params.initial_r2t = parse_bool(value)  # OR with our No
        return "Yes" if params.initial_r2t else "No"
    if key == "ImmediateData":
        params.immediate_data = parse_bool(value)  # AND with our Yes
        return "Yes" if params.immediate_data else "No"
    if key == "MaxRecvDataSegmentLength":
        params.max_recv_data_segment_length = parse_number(value, 512, 2**24 - 1)
        return None
    if key == "MaxBurstLength":
        params.max_burst_length = min(parse_number(value, 512, 2**24 - 1), TARGET_MAX_BURST)
        params.first_burst_length = min(params.first_burst_length, params.max_burst_length)
        return str(params.max_burst_length)
    if key == "FirstBurstLength":
        params.first_burst_length = min(parse_number(value, 512, 2**24 - 1), TARGET_FIRST_BURST, params.max_burst_length)
        return str(params.first_burst_length)
    if key == "DefaultTime2Wait":
        params.default_time2wait = max(parse_number(value, 0, 3600), 2)
        return str(params.default_time2wait)
    if key == "DefaultTime2Retain":
        params.default_time2retain = min(parse_number(value, 0, 3600), 20)
        return str(params.default_time2retain)
    if key == "MaxOutstandingR2T":
        params.max_outstanding_r2t = min(parse_number(value, 1, 65535), TARGET_MAX_OUTSTANDING_R2T)
        return str(params.max_outstanding_r2t)
    if key == "DataPDUInOrder":
        parse_bool(value)
        params.data_pdu_in_order = True
        return "Yes"
    if key == "DataSequenceInOrder":
        parse_bool(value)
        params.data_sequence_in_order = True
        return "Yes"
    if key == "ErrorRecoveryLevel":
        parse_number(value, 0, 2)
        params.error_recovery_level = 0
        return "0"
    if key in ("IFMarker", "OFMarker"):
        parse_bool(value)
        return "No"
    if key in ("OFMarkInt", "IFMarkInt"):
        return "Irrelevant"
    if key == "TargetAlias" or key == "TargetAddress" or key == "TargetPortalGroupTag":
        raise NegotiationError(f"{key} is declared by the target only")
    return "NotUnderstood"
