"""One iSCSI connection as a sans-I/O state machine: bytes in, PDUs parsed and answered, SCSI tasks handed out.

receive() returns the tasks that are ready to run; complete() turns a task's SCSI reply into Data-In and status.
Everything to send collects in outbox; `closing` says the connection must be dropped once the outbox is written."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from san.iscsi._wire import account, command_fields
from san.iscsi.chap import ChapError, ChapExchange
from san.iscsi.keys import (
    DECLARED_BY_INITIATOR,
    TARGET_MAX_RECV,
    NegotiationError,
    Parameters,
    encode_text,
    negotiate,
    parse_text,
)
from san.iscsi.pdu import (
    BHS_LENGTH,
    INITIATOR_OPCODES,
    PDU,
    RESERVED_TAG,
    Opcode,
    RejectReason,
    build,
    digest,
    header_lengths,
    padding,
)
from san.iscsi.session import QUEUE_DEPTH, Session, serial_add
from san.iscsi.target import PORTAL_GROUP_TAG, Target
from san.model import printable, shown
from san.scsi.disk import Reply
from san.scsi.luns import LunView
from san.scsi.sense import Key, Status, fixed_sense, invalid_field

log = logging.getLogger("san.iscsi")
LOGIN_DATA_LIMIT = 64 * 1024
MAX_DATA_OUT = 16 << 20  # the most data-out one command may carry (the largest transfer is 8 MiB, or 2x for C&W)
MAX_TASKS = 2 * QUEUE_DEPTH  # commands of one connection in progress at once, immediate ones included
SECURITY, FULL_FEATURE = 0, 3


class State(Enum):
    LOGIN = "login"
    FULL_FEATURE = "full feature"
    LOGGED_OUT = "logged out"


class LoginFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Task:
    """A SCSI command on this connection, from its PDU to its status."""

    itt: int
    lun: int
    cdb: bytes
    edtl: int
    read: bool
    write: bool
    immediate: bool
    buffer: bytearray = field(default_factory=bytearray)
    received: int = 0
    unsolicited: bool = False
    next_offset: int = 0
    bursts: dict[int, tuple[int, int]] = field(default_factory=dict)
    sequences: dict[int, tuple[int, int]] = field(default_factory=dict)  # per TTT: next DataSN, next offset
    r2t_sn: int = 0
    started: bool = False
    aborted: bool = False
    arrived: int = 0  # time.monotonic_ns() when its command PDU came in (0: the target counts no I/O statistics)


class Connection:
    """The target side of one TCP connection."""

    def __init__(self, target: Target, local: tuple[str, int] | None = None, peer: str = "") -> None:
        self.target = target
        self.io_stats = target.io_stats  # count each answered command in its vdisk's I/O statistics
        self.local = local
        self.peer = peer
        self.peer_port = 0  # the initiator's TCP port, for `san session list` (peer is its address)
        self.state = State.LOGIN
        self.params = Parameters()
        self.session: Session | None = None
        self.buffer = bytearray()
        self.outbox: list[bytes | bytearray | memoryview] = []
        self.closing = False
        self.stat_sn = 0
        self.exp_cmd_sn = 0
        self.tasks: dict[int, Task] = {}
        self.discarding: set[int] = set()
        self.tmf_waiting: list[tuple[set[int], int, int, bool]] = []  # (running aborted ITTs, TMF ITT, answer, cold)
        self.next_ttt = 1
        self.digests = (False, False)
        # login state
        self.stage = SECURITY
        self.login_keys: dict[str, str] = {}
        self.initiator = ""
        self.isid = b""
        self.tsih = 0
        self.discovery = False
        self.chap: ChapExchange | None = None
        self.authenticated = False
        self.backing_off = False
        self.login_text = bytearray()
        self.sent_first_response = False
        self.text_pending = bytearray()

    # -- bytes in ------------------------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> list[Task]:
        """Feed bytes from the socket; returns SCSI tasks ready to execute."""
        self.buffer += data
        ready: list[Task] = []
        while not self.closing:
            pdu = self._next_pdu()
            if pdu is None:
                break
            ready.extend(self._dispatch(pdu))
        return ready

    def _next_pdu(self) -> PDU | None:
        buf = self.buffer
        if len(buf) < BHS_LENGTH:
            return None
        ahs_length, data_length = header_lengths(buf)
        header_digest, data_digest = self.digests
        header_end = BHS_LENGTH + ahs_length + (4 if header_digest else 0)
        limit = TARGET_MAX_RECV if self.state is State.FULL_FEATURE else LOGIN_DATA_LIMIT
        if data_length > limit:
            self._reject(bytes(buf[:BHS_LENGTH]), RejectReason.PROTOCOL_ERROR)
            self.closing = True
            return None
        padded = data_length + padding(data_length)
        total = header_end + padded + (4 if data_digest and data_length else 0)
        if len(buf) < total:
            return None
        bhs = bytes(buf[:BHS_LENGTH])
        if header_digest and digest(buf[: BHS_LENGTH + ahs_length]) != buf[header_end - 4 : header_end]:
            self.closing = True  # the lengths cannot be trusted: at ErrorRecoveryLevel 0 the connection goes
            return None
        data = bytes(buf[header_end : header_end + data_length])
        if data_digest and data_length:
            expected = digest(buf[header_end : header_end + padded])
            if expected != buf[total - 4 : total]:
                del buf[:total]
                self._reject(bhs, RejectReason.DATA_DIGEST_ERROR)
                if bhs[0] & 0x3F in (Opcode.SCSI_COMMAND, Opcode.DATA_OUT):
                    self.closing = True
                return PDU(b"")
        pdu = PDU(bhs, bytes(buf[BHS_LENGTH : BHS_LENGTH + ahs_length]), data)
        del buf[:total]
        return pdu

    def _dispatch(self, pdu: PDU) -> list[Task]:
        if not pdu.bhs:
            return []
        opcode = pdu.opcode
        if self.state is State.LOGIN:
            if opcode != Opcode.LOGIN:
                self.closing = True  # RFC 7143 6.2: anything but a Login Request before login completes
                return []
            self._login(pdu)
            return []
        if self.state is State.LOGGED_OUT:
            return []
        if opcode == Opcode.DATA_OUT:
            return self._data_out(pdu)
        if opcode == Opcode.SNACK:
            self._reject(pdu.bhs, RejectReason.SNACK_REJECT)
            return []
        session = self.session
        assert session is not None
        cmd_sn = pdu.u32(24)
        if opcode not in INITIATOR_OPCODES or opcode == Opcode.LOGIN:
            unknown = opcode not in INITIATOR_OPCODES
            self._reject(pdu.bhs, RejectReason.COMMAND_NOT_SUPPORTED if unknown else RejectReason.PROTOCOL_ERROR)
            # Its number is used up, so that no later command waits behind it.
            return [] if pdu.immediate else self._in_order(session.accept(cmd_sn, None))
        if pdu.immediate:
            if len(self.tasks) >= MAX_TASKS:
                self._reject(pdu.bhs, RejectReason.IMMEDIATE_COMMAND_REJECT)
                return []
            return self._command(pdu)
        return self._in_order(session.accept(cmd_sn, pdu))

    def _in_order(self, items: list[PDU | None]) -> list[Task]:
        """Carry out the PDUs that are now in CmdSN order (None: a number used up by a rejected PDU)."""
        ready: list[Task] = []
        for item in items:
            if item is not None:
                ready.extend(self._command(item))
        return ready

    def _command(self, pdu: PDU) -> list[Task]:
        """A PDU in CmdSN order (its number is used up even when it is rejected, so no later command waits for it)."""
        opcode = pdu.opcode
        assert self.session is not None
        if self.session.discovery and opcode not in (Opcode.TEXT, Opcode.LOGOUT, Opcode.NOP_OUT):
            self._reject(pdu.bhs, RejectReason.PROTOCOL_ERROR)
            return []
        if opcode == Opcode.SCSI_COMMAND:
            return self._scsi_command(pdu)
        if opcode == Opcode.NOP_OUT:
            self._nop_out(pdu)
        elif opcode == Opcode.TEXT:
            self._text(pdu)
        elif opcode == Opcode.LOGOUT:
            self._logout(pdu)
        elif opcode == Opcode.TASK_MANAGEMENT:
            self._task_management(pdu)
        else:
            self._reject(pdu.bhs, RejectReason.COMMAND_NOT_SUPPORTED)
        return []

    # -- numbering -----------------------------------------------------------------------------------------

    def _numbers(self, advance: bool = True) -> tuple[int, int, int]:
        """(StatSN, ExpCmdSN, MaxCmdSN) for the next PDU; StatSN advances unless told not to."""
        stat_sn = self.stat_sn
        if advance:
            self.stat_sn = serial_add(self.stat_sn, 1)
        if self.session is None:
            return stat_sn, self.exp_cmd_sn, self.exp_cmd_sn
        return stat_sn, self.session.exp_cmd_sn, self.session.max_cmd_sn

    def _send(self, header: bytes, data: bytes | bytearray | memoryview = b"") -> None:
        header_digest, data_digest = self.digests
        self.outbox.append(header)
        if header_digest:
            self.outbox.append(digest(header))
        if data:
            self.outbox.append(data)
            pad = padding(len(data))
            if pad:
                self.outbox.append(bytes(pad))
            if data_digest:
                self.outbox.append(digest(data, bytes(pad)))

    def _reject(self, bhs: bytes, reason: RejectReason) -> None:
        stat_sn, exp, top = self._numbers()
        header, data = build(Opcode.REJECT, 0x80, bhs, itt=RESERVED_TAG, words=(0, stat_sn, exp, top), byte2=reason)
        self._send(header, data)

    # -- login ---------------------------------------------------------------------------------------------

    def _login(self, pdu: PDU) -> None:
        transit, cont = bool(pdu.flags & 0x80), bool(pdu.flags & 0x40)
        csg, nsg = (pdu.flags >> 2) & 0x03, pdu.flags & 0x03
        try:
            if pdu.bhs[3] > 0:
                raise LoginFailed(0x0205, "unsupported version: only version 0 is spoken")
            if transit and cont:
                raise LoginFailed(0x0200, "T and C both set")
            if csg in (2, 3) or (transit and (nsg == 2 or nsg <= csg)) or (csg < self.stage and self.sent_first_response):
                raise LoginFailed(0x0200, "bad login stage")
            if not self.isid:
                self.isid, self.tsih, self.exp_cmd_sn = pdu.bhs[8:14], pdu.u16(14), pdu.u32(24)
                self.stat_sn = pdu.u32(28)
            elif pdu.bhs[8:14] != self.isid:
                raise LoginFailed(0x0200, "ISID changed during login")
            self.login_text += pdu.data
            if len(self.login_text) > LOGIN_DATA_LIMIT:
                raise LoginFailed(0x0200, "login text too long")
            if cont:
                self._login_response(pdu, csg, 0, False, [])
                return
            pairs = parse_text(self.login_text)
            self.login_text.clear()
            answers = self._login_keys(pairs, csg)
            if csg == SECURITY:
                answers += self._security(pairs, transit)
                if self.chap is not None and not self.authenticated:
                    transit = False
            else:
                if not self.authenticated:
                    self._require_no_auth()
                answers += self._operational(pairs)
            if transit and nsg == FULL_FEATURE:
                self._enter_full_feature()
                self._login_response(pdu, csg, nsg, True, answers)
                self.digests = (self.params.header_digest, self.params.data_digest)  # from the next PDU on
                return
            self.stage = nsg if transit else csg
            self._login_response(pdu, csg, nsg if transit else 0, transit, answers)
        except NegotiationError as exc:
            self._login_failed(pdu, 0x0200, str(exc))
        except ChapError as exc:
            self._login_failed(pdu, 0x0201, str(exc))
        except LoginFailed as exc:
            self._login_failed(pdu, exc.status, str(exc))

    def _login_keys(self, pairs: list[tuple[str, str]], csg: int) -> list[tuple[str, str]]:
        seen = set()
        for key, value in pairs:
            if key in seen:
                raise NegotiationError(f"key {key} given twice")
            seen.add(key)
            self.login_keys[key] = value
        if not self.initiator:
            name = self.login_keys.get("InitiatorName", "")
            if not name:
                raise LoginFailed(0x0207, "InitiatorName is missing")
            self.initiator = name
            session_type = self.login_keys.get("SessionType", "Normal")
            if session_type not in ("Normal", "Discovery"):
                raise LoginFailed(0x0209, f"session type {session_type!r} is not supported")
            self.discovery = session_type == "Discovery"
            if not self.discovery:
                target_name = self.login_keys.get("TargetName", "")
                if not target_name:
                    raise LoginFailed(0x0207, "TargetName is missing")
                if target_name != self.target.name:
                    raise LoginFailed(0x0203, f"no target {target_name!r}")
            access = self.target.lookup(self.initiator)
            if access is None and not self.discovery:
                raise LoginFailed(0x0202, "this initiator may not use this target")
            if self.tsih:
                raise LoginFailed(0x020A, "adding a connection to a session is not supported (MaxConnections=1)")
        answers: list[tuple[str, str]] = []
        if not self.sent_first_response and not self.discovery:
            answers.append(("TargetPortalGroupTag", str(PORTAL_GROUP_TAG)))
        return answers

    def _security(self, pairs: list[tuple[str, str]], transit: bool) -> list[tuple[str, str]]:
        keys = dict(pairs)
        access = self.target.lookup(self.initiator)
        credentials = access.credentials if access is not None else None
        answers: list[tuple[str, str]] = []
        if "AuthMethod" in keys:
            offered = keys["AuthMethod"].split(",")
            if credentials is not None:
                if "CHAP" not in offered:
                    raise ChapError("this host must log in with CHAP")
                answers.append(("AuthMethod", "CHAP"))
                self.chap = ChapExchange(credentials)
            elif "None" in offered:
                answers.append(("AuthMethod", "None"))
                self.authenticated = True
            else:
                answers.append(("AuthMethod", "Reject"))
            return answers
        if self.chap is not None and "CHAP_A" in keys:
            if "5" not in keys["CHAP_A"].split(","):
                raise ChapError("only CHAP_A=5 (MD5) is supported")
            return self.chap.offer()
        if self.chap is not None and "CHAP_N" in keys:
            guard = self.target.guard
            wait = guard.wait(self.initiator, self.peer)
            if wait > 0:
                self.backing_off = True  # refused unchecked, as retryable (0301): a host in the way comes back later
                raise LoginFailed(0x0301, f"too many failed logins: the next is checked in {wait:.0f} s")
            try:
                answers = self.chap.verify(keys)
            except ChapError:
                guard.failed(self.initiator, self.peer)
                raise
            guard.succeeded(self.initiator, self.peer)
            self.authenticated = True
            return answers
        if transit:
            self._require_no_auth()
        return answers

    def _require_no_auth(self) -> None:
        access = self.target.lookup(self.initiator)
        if access is not None and access.credentials is not None and not self.authenticated:
            raise ChapError("this host must authenticate with CHAP")
        self.authenticated = True

    def _operational(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key in DECLARED_BY_INITIATOR or key.startswith("X-") or key.startswith("X#"):
                continue
            if key in ("AuthMethod",) or key.startswith("CHAP_"):
                raise NegotiationError(f"{key} outside the security stage")
            answer = negotiate(key, value, self.params, self.discovery)
            if answer is not None:
                answers.append((key, answer))
        if not self.params.declared:
            self.params.declared = True
            answers.append(("MaxRecvDataSegmentLength", str(TARGET_MAX_RECV)))
        return answers

    def _login_response(self, pdu: PDU, csg: int, nsg: int, transit: bool, answers: list[tuple[str, str]]) -> None:
        self.sent_first_response = True
        flags = (0x80 if transit else 0) | (csg << 2) | nsg
        stat_sn, exp, top = self.stat_sn, self.exp_cmd_sn, serial_add(self.exp_cmd_sn, 1)
        self.stat_sn = serial_add(self.stat_sn, 1)
        tsih = self.tsih if transit and nsg == FULL_FEATURE else 0
        bhs = struct.pack(
            ">BBBBI6sHIIIIIBB10x", Opcode.LOGIN_RESPONSE, flags, 0, 0, 0, self.isid, tsih, pdu.itt, 0, stat_sn, exp, top, 0, 0
        )
        data = encode_text(answers)
        self._send(bhs[:4] + len(data).to_bytes(4, "big") + bhs[8:], data)

    def _login_failed(self, pdu: PDU, status: int, message: str) -> None:
        bhs = struct.pack(
            ">BBBBI6sHIIIIIBB10x",
            Opcode.LOGIN_RESPONSE,
            0,
            0,
            0,
            0,
            pdu.bhs[8:14],
            0,
            pdu.itt,
            0,
            self.stat_sn,
            self.exp_cmd_sn,
            self.exp_cmd_sn,
            status >> 8,
            status & 0xFF,
        )
        self._send(bhs)
        who = shown(self.initiator) if self.initiator else "an unnamed initiator"
        if not self.backing_off or self.target.refusals.ready(self.peer):
            held = self.target.refusals.since(self.peer) if self.backing_off else 0
            more = f" ({held} more refused unchecked since the last line)" if held else ""
            reason = printable(message[:200])
            log.warning("login from %s at %s refused (status %04x): %s%s", who, self.peer or "?", status, reason, more)
        self.closing = True

    def _enter_full_feature(self) -> None:
        old = self.target.sessions.pop((self.initiator, self.isid), None)
        if old is not None and old.connection is not None:
            old.connection.close()  # session reinstatement: the old session's connection goes
        access = self.target.lookup(self.initiator)
        nexus = f"{self.initiator},i,0x{self.isid.hex()}"
        self.tsih = self.target.allocate_tsih()
        view = LunView(nexus, access.luns if access is not None else {})
        self.session = Session(self.initiator, self.isid, self.tsih, self.discovery, view, self.params, self.exp_cmd_sn)
        self.session.connection = self
        if not self.discovery:
            self.target.sessions[(self.initiator, self.isid)] = self.session
        self.state = State.FULL_FEATURE
        how = "CHAP" if self.chap is not None else "no authentication"
        kind = "discovery session" if self.discovery else f"session {self.tsih}"
        log.info("login from %s at %s accepted: %s, %s", shown(self.initiator), self.peer or "?", kind, how)

    def close(self) -> None:
        """Drop this connection (reinstatement, reset, logout): tasks are abandoned, nothing more is sent."""
        self.closing = True
        for task in self.tasks.values():
            task.aborted = True
        self.forget()

    def forget(self) -> None:
        """Remove the session from the target when the connection ends."""
        session = self.session
        if session is not None and self.target.sessions.get((session.initiator, session.isid)) is session:
            del self.target.sessions[(session.initiator, session.isid)]
            session.view.lost()

    # -- full feature phase --------------------------------------------------------------------------------

    def _nop_out(self, pdu: PDU) -> None:
        if pdu.itt == RESERVED_TAG:
            return  # the answer to our ping
        stat_sn, exp, top = self._numbers()
        header, data = build(Opcode.NOP_IN, 0x80, pdu.data, pdu.lun, pdu.itt, (RESERVED_TAG, stat_sn, exp, top))
        self._send(header, data)

    def ping(self) -> int:
        """A NOP-In asking the initiator for a NOP-Out (a dead-peer check); returns its target transfer tag."""
        ttt = self._new_ttt()
        stat_sn, exp, top = self._numbers(advance=False)
        header, _ = build(Opcode.NOP_IN, 0x80, b"", -1, RESERVED_TAG, (ttt, stat_sn, exp, top))
        self._send(header)
        return ttt

    def _new_ttt(self) -> int:
        ttt = self.next_ttt
        self.next_ttt = (self.next_ttt + 1) & 0xFFFFFFFF or 1
        if self.next_ttt == RESERVED_TAG:
            self.next_ttt = 1
        return ttt

    def _text(self, pdu: PDU) -> None:
        self.text_pending += pdu.data
        answers: list[tuple[str, str]] = []
        if len(self.text_pending) > LOGIN_DATA_LIMIT:
            self.text_pending.clear()
            self._reject(pdu.bhs, RejectReason.PROTOCOL_ERROR)
            return
        if not pdu.flags & 0x40:
            try:
                pairs = parse_text(self.text_pending)
            except NegotiationError:
                self.text_pending.clear()
                self._reject(pdu.bhs, RejectReason.PROTOCOL_ERROR)
                return
            self.text_pending.clear()
            for key, value in pairs:
                if key == "SendTargets":
                    answers += self._send_targets(value)
                elif not key.startswith("X-"):
                    answers.append((key, "NotUnderstood"))
        stat_sn, exp, top = self._numbers()
        final = not pdu.flags & 0x40
        flags = 0x80 if final else 0  # to a request that continues: an empty answer that asks for the rest
        ttt = RESERVED_TAG if final else self._new_ttt()
        header, body = build(Opcode.TEXT_RESPONSE, flags, encode_text(answers), -1, pdu.itt, (ttt, stat_sn, exp, top))
        self._send(header, body)

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        access = self.target.lookup(self.initiator)
        if access is None:
            return []
        if value not in ("All", self.target.name) and not (value == "" and not self.discovery):
            return []
        return [("TargetName", self.target.name)] + [("TargetAddress", a) for a in self.target.addresses(self.local)]

    def _logout(self, pdu: PDU) -> None:
        reason = pdu.flags & 0x7F
        response = 0 if reason in (0, 1) else 2  # recovery removal is not supported at ErrorRecoveryLevel 0
        stat_sn, exp, top = self._numbers()
        header, _ = build(Opcode.LOGOUT_RESPONSE, 0x80, b"", -1, pdu.itt, (0, stat_sn, exp, top, 0, 0, 0), byte2=response)
        self._send(header)
        if response == 0:
            self.state = State.LOGGED_OUT
            self.closing = True
            for task in self.tasks.values():
                task.aborted = True
            self.forget()

    def _task_management(self, pdu: PDU) -> None:
        """ABORT TASK, ABORT/CLEAR TASK SET, LUN RESET, TARGET WARM/COLD RESET (the resets reach only the caller's
        LUNs). The answer waits until aborted commands that were running have ended, so none lands after it."""
        function = pdu.flags & 0x7F
        session = self.session
        assert session is not None
        lun = pdu.lun
        response = 0
        waiting: set[int] = set()
        if function == 1:  # ABORT TASK
            task = self.tasks.get(pdu.u32(20))
            if task is None:
                # RFC 7143 11.5.1: a task never received (RefCmdSN still in the window) counts as aborted; one that
                # has completed already (RefCmdSN below the window) does not exist.
                response = 0 if session.in_window(pdu.u32(32)) else 1
            elif task.lun != lun:
                response = 1
            else:
                waiting = self._abort_where(lambda conn, t: t is task)
        elif function in (2, 4):  # ABORT TASK SET, CLEAR TASK SET
            waiting = self._abort_where(lambda conn, t: conn is self and t.lun == lun)
        elif function in (5, 6, 7):  # LOGICAL UNIT RESET, TARGET WARM / COLD RESET
            zoned = [session.view.luns[lun]] if function == 5 and lun in session.view.luns else []
            if function != 5:
                zoned = list(session.view.luns.values())
            if not zoned:
                response = 2
            disks = {id(z.disk) for z in zoned}
            waiting = self._abort_where(lambda conn, t: id(_disk_of(conn, t)) in disks)
            for z in zoned:
                z.disk.reset()
        else:
            response = 5
        self.tmf_waiting.append((waiting, pdu.itt, response, function == 7))
        self._answer_tmfs()

    def _abort_where(self, match: Callable[[Connection, Task], bool]) -> set[int]:
        """Abort the matching tasks of every connection; returns this connection's ones that are still running."""
        waiting: set[int] = set()
        for conn in self._connections():
            for itt, task in list(conn.tasks.items()):
                if match(conn, task):
                    task.aborted = True
                    del conn.tasks[itt]
                    if not task.started:
                        conn.discarding.add(itt)  # its remaining Data-Out PDUs are dropped quietly
                    elif conn is self:
                        waiting.add(itt)
        return waiting

    def _answer_tmfs(self) -> None:
        while self.tmf_waiting and not self.tmf_waiting[0][0]:
            _, itt, response, cold = self.tmf_waiting.pop(0)
            stat_sn, exp, top = self._numbers()
            words = (0, stat_sn, exp, top)
            header, _ = build(Opcode.TASK_MANAGEMENT_RESPONSE, 0x80, b"", -1, itt, words, byte2=response)
            self._send(header)
            if cold:
                self.closing = True

    def _connections(self) -> list[Connection]:
        found = [s.connection for s in self.target.sessions.values() if isinstance(s.connection, Connection)]
        return found if self in found else [*found, self]

    # -- SCSI commands and data ----------------------------------------------------------------------------

    def _scsi_command(self, pdu: PDU) -> list[Task]:
        flags, lun, itt, edtl, _ = command_fields(pdu.bhs)
        cdb = pdu.bhs[32:48]
        if pdu.ahs:
            self._reject(pdu.bhs, RejectReason.INVALID_PDU_FIELD)  # extended CDBs are not supported
            return []
        if self.discarding:
            self.discarding.discard(itt)
        if itt in self.tasks or itt == RESERVED_TAG:
            self._reject(pdu.bhs, RejectReason.TASK_IN_PROGRESS if itt != RESERVED_TAG else RejectReason.INVALID_PDU_FIELD)
            return []
        read, write = bool(flags & 0x40), bool(flags & 0x20)
        task = Task(itt, lun, cdb, edtl, read, write, pdu.immediate, arrived=time.monotonic_ns() if self.io_stats else 0)
        immediate = len(pdu.data)
        if immediate and (
            not write or immediate > edtl or not self.params.immediate_data or immediate > self.params.first_burst_length
        ):
            self._reject(pdu.bhs, RejectReason.PROTOCOL_ERROR)
            return []
        if not flags & 0x80 and (not write or self.params.initial_r2t):
            self._reject(pdu.bhs, RejectReason.PROTOCOL_ERROR)
            return []
        if write and edtl > MAX_DATA_OUT:
            # Never allocate what a header merely claims: larger than any command here takes, so refused outright.
            self.tasks[itt] = task
            if not flags & 0x80:
                self.discarding.add(itt)
            self.complete(task, Reply(Status.CHECK_CONDITION, sense=invalid_field(0).sense))
            return []
        self.tasks[itt] = task
        if not write:
            return [task]
        task.buffer = bytearray(edtl)
        task.buffer[:immediate] = pdu.data
        task.received = immediate
        task.next_offset = immediate
        task.unsolicited = not flags & 0x80
        if task.unsolicited:
            task.next_offset = min(self.params.first_burst_length, edtl)
            task.sequences[RESERVED_TAG] = (0, immediate)
        return self._more_data(task)

    def _more_data(self, task: Task) -> list[Task]:
        """Ask for the rest of a write with R2Ts, or hand the task over once every byte is in."""
        if task.received >= task.edtl and not task.bursts and not task.unsolicited:
            return [task]
        if task.unsolicited:
            return []
        while task.next_offset < task.edtl and len(task.bursts) < self.params.max_outstanding_r2t:
            length = min(self.params.max_burst_length, task.edtl - task.next_offset)
            ttt = self._new_ttt()
            task.bursts[ttt] = (task.next_offset, length)
            task.sequences[ttt] = (0, task.next_offset)
            stat_sn, exp, top = self._numbers(advance=False)
            words = (ttt, stat_sn, exp, top, task.r2t_sn, task.next_offset, length)
            header, _ = build(Opcode.R2T, 0x80, b"", task.lun, task.itt, words)
            self._send(header)
            task.r2t_sn += 1
            task.next_offset += length
        return []

    def _fail_data_sequence(self, task: Task, pdu: PDU) -> None:
        """A Data-Out out of sequence (DataSN or offset): reject it and end the task with CHECK CONDITION (ABORTED
        COMMAND, DATA PHASE ERROR); the session goes on, and the rest of that task's data is dropped."""
        self._reject(pdu.bhs, RejectReason.PROTOCOL_ERROR)
        del self.tasks[task.itt]
        task.aborted = True
        self.discarding.add(task.itt)
        sense = fixed_sense(Key.ABORTED_COMMAND, 0x4B, 0x00)
        stat_sn, exp, top = self._numbers()
        words = (0, stat_sn, exp, top, 0, 0, 0)
        body = struct.pack(">H", len(sense)) + sense
        header, data = build(Opcode.SCSI_RESPONSE, 0x80, body, -1, task.itt, words, 0, Status.CHECK_CONDITION)
        self._send(header, data)

    def _data_out(self, pdu: PDU) -> list[Task]:
        if pdu.itt in self.discarding:
            if pdu.final:
                self.discarding.discard(pdu.itt)
            return []
        task = self.tasks.get(pdu.itt)
        if task is None or not task.write:
            self._reject(pdu.bhs, RejectReason.INVALID_PDU_FIELD)
            return []
        ttt, offset, length = pdu.u32(20), pdu.u32(40), len(pdu.data)
        if ttt == RESERVED_TAG:
            if not task.unsolicited or offset + length > min(self.params.first_burst_length, task.edtl):
                self._reject(pdu.bhs, RejectReason.PROTOCOL_ERROR)
                return []
        else:
            burst = task.bursts.get(ttt)
            if burst is None or not burst[0] <= offset or offset + length > burst[0] + burst[1]:
                self._reject(pdu.bhs, RejectReason.PROTOCOL_ERROR)
                return []
        if task.sequences.get(ttt) != (pdu.u32(36), offset):
            self._fail_data_sequence(task, pdu)
            return []
        if pdu.final:
            burst_end = min(self.params.first_burst_length, task.edtl) if ttt == RESERVED_TAG else sum(task.bursts[ttt])
            if offset + length != burst_end:
                self._fail_data_sequence(task, pdu)  # F before the burst is complete: the rest would never come
                return []
        task.sequences[ttt] = (pdu.u32(36) + 1, offset + length)
        task.buffer[offset : offset + length] = pdu.data
        task.received += length
        if pdu.final:
            if ttt == RESERVED_TAG:
                task.unsolicited = False
                task.next_offset = max(task.next_offset, offset + length)
            else:
                task.bursts.pop(ttt, None)
        if task.started or task.aborted:
            return []
        return self._more_data(task)

    def complete(self, task: Task, reply: Reply) -> None:
        """Send a finished task's data and status (Data-In with status collapsed into the last PDU when possible),
        and count it in its vdisk's I/O statistics."""
        if task.aborted:
            for waiting, *_ in self.tmf_waiting:
                waiting.discard(task.itt)
            self._answer_tmfs()
        if self.tasks.get(task.itt) is not task or task.aborted or self.closing:
            return
        del self.tasks[task.itt]
        self._respond(task, reply)
        sent = task.edtl if task.read else 0  # at most: a fast read counted all its blocks, some may not have been sent
        if self.io_stats and self.session is not None and (not reply.counted or len(reply.data) > sent):
            account(self.session.view.luns, task, reply)

    def _respond(self, task: Task, reply: Reply) -> None:
        lun = task.lun
        if task.read and reply.status == Status.GOOD and len(reply.data) == task.edtl and self._single_pdu(task.edtl):
            stat_sn, exp, top = self._numbers()  # the common read: one Data-In PDU carrying the status
            header, body = build(Opcode.DATA_IN, 0x81, reply.data, lun, task.itt, (RESERVED_TAG, stat_sn, exp, top))
            self._send(header, body)
            return
        data = memoryview(reply.data).cast("B") if reply.data else memoryview(b"")
        residual_flags, residual = 0, 0
        if task.read:
            if len(data) > task.edtl:
                residual_flags, residual = 0x04, len(data) - task.edtl
                data = data[: task.edtl]
            elif len(data) < task.edtl:
                residual_flags, residual = 0x02, task.edtl - len(data)
        elif task.write and reply.wanted >= 0:
            if reply.wanted > task.edtl:
                residual_flags, residual = 0x04, reply.wanted - task.edtl
            elif reply.wanted < task.edtl:
                residual_flags, residual = 0x02, task.edtl - reply.wanted
        elif task.edtl and not task.write:
            residual_flags, residual = 0x02, task.edtl
        elif not task.read and not task.write and len(data):
            data = memoryview(b"")
        collapse = reply.status == Status.GOOD and not reply.sense and len(data) > 0
        data_pdus = 0
        if task.read and len(data):
            data_pdus = self._data_in(task, data, lun, collapse, residual_flags, residual, reply.status)
            if collapse:
                return
        stat_sn, exp, top = self._numbers()
        sense = struct.pack(">H", len(reply.sense)) + reply.sense if reply.sense else b""
        words = (0, stat_sn, exp, top, data_pdus, 0, residual)  # ExpDataSN: the Data-In PDUs sent before it
        header, body = build(Opcode.SCSI_RESPONSE, 0x80 | residual_flags, sense, -1, task.itt, words, 0, reply.status)
        self._send(header, body)

    def _single_pdu(self, length: int) -> bool:
        return 0 < length <= self.params.max_recv_data_segment_length and length <= self.params.max_burst_length

    def _data_in(
        self, task: Task, data: memoryview, lun: int, collapse: bool, residual_flags: int, residual: int, status: int
    ) -> int:
        """Data-In PDUs of at most the initiator's MaxRecvDataSegmentLength, F set at the end of each burst."""
        step = self.params.max_recv_data_segment_length
        burst = self.params.max_burst_length
        pieces = [
            (offset, min(offset + step, start + burst, len(data)))
            for start in range(0, len(data), burst)
            for offset in range(start, min(start + burst, len(data)), step)
        ]
        for data_sn, (offset, end) in enumerate(pieces):
            last = end == len(data)
            flags = 0x80 if last or end % burst == 0 else 0
            status_here = last and collapse
            if status_here:
                flags |= 0x01 | residual_flags
            stat_sn, exp, top = self._numbers(advance=status_here)
            words = (RESERVED_TAG, stat_sn if status_here else 0, exp, top, data_sn, offset, residual if status_here else 0)
            header, body = build(Opcode.DATA_IN, flags, data[offset:end], lun, task.itt, words, 0, status if status_here else 0)
            self._send(header, body)
        return len(pieces)


def _disk_of(connection: Connection, task: Task) -> object:
    """The SCSI unit a task of a connection addresses (None when its LUN is not zoned there)."""
    zoned = connection.session.view.luns.get(task.lun) if connection.session is not None else None
    return zoned.disk if zoned is not None else None
