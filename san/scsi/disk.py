"""One vdisk as a SCSI direct-access block device: decodes each CDB, checks it, and carries it out through the agent.

Per-nexus state (pending unit attentions, SPC-2 reservations) lives here too; frontends pass the nexus with each CDB."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from san.agent.agent import Agent, AgentIOError
from san.protocol.messages import Reason
from san.scsi import pages
from san.scsi.opcodes import SA_GET_LBA_STATUS, SA_READ_CAPACITY_16, SA_REPORT_SUPPORTED_OPCODES, Op
from san.scsi.reservations import Conflict, Reservations
from san.scsi.sense import (
    CheckCondition,
    Key,
    Status,
    UnitAttention,
    fixed_sense,
    invalid_field,
    invalid_opcode,
    invalid_parameter,
    lba_out_of_range,
    lun_not_supported,
    medium_error,
    miscompare,
    parameter_list_length_error,
    space_allocation_failed,
    write_error,
    write_protected,
)

Data = bytes | bytearray | memoryview
FAST_OPCODES = frozenset({Op.READ_10, Op.READ_16, Op.WRITE_10, Op.WRITE_16})
# Commands whose medium errors are read errors (the rest fail writing or flushing).
READING = frozenset({Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16, Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16,
                     Op.PRE_FETCH_10, Op.PRE_FETCH_16, Op.SERVICE_ACTION_IN_16})  # fmt: skip
# Commands a nexus may send while it has a unit attention pending, without being told of it (SPC-4 5.14).
UA_EXEMPT = frozenset({Op.INQUIRY, Op.REPORT_LUNS, Op.REQUEST_SENSE})
# Commands allowed through an SPC-2 reservation held by another nexus.
RESERVATION_EXEMPT = frozenset(
    {Op.INQUIRY, Op.REPORT_LUNS, Op.REQUEST_SENSE, Op.RELEASE_6, Op.RELEASE_10, Op.READ_CAPACITY_10, Op.SERVICE_ACTION_IN_16}
)
# Under a persistent reservation another nexus holds (SPC-4 table 45 / SBC-3 table 13): what counts as a read
# (conflicts only for the exclusive-access types) and what as a write; everything else goes through.
PR_READS = frozenset(
    {
        Op.READ_6,
        Op.READ_10,
        Op.READ_12,
        Op.READ_16,
        Op.VERIFY_10,
        Op.VERIFY_12,
        Op.VERIFY_16,
        Op.PRE_FETCH_10,
        Op.PRE_FETCH_16,
        Op.MODE_SENSE_6,
        Op.MODE_SENSE_10,
    }
)
PR_WRITES = frozenset(
    {
        Op.WRITE_6,
        Op.WRITE_10,
        Op.WRITE_12,
        Op.WRITE_16,
        Op.WRITE_AND_VERIFY_10,
        Op.WRITE_AND_VERIFY_12,
        Op.WRITE_AND_VERIFY_16,
        Op.COMPARE_AND_WRITE,
        Op.WRITE_SAME_10,
        Op.WRITE_SAME_16,
        Op.UNMAP,
        Op.SYNCHRONIZE_CACHE_10,
        Op.SYNCHRONIZE_CACHE_16,
        Op.MODE_SELECT_6,
        Op.MODE_SELECT_10,
        Op.START_STOP_UNIT,
        Op.RESERVE_6,
        Op.RESERVE_10,
        Op.RELEASE_6,
        Op.RELEASE_10,
    }
)


@dataclass
class Reply:
    """How a command ended: status, the data-in it returns, and sense data for CHECK CONDITION."""

    status: int = Status.GOOD
    data: Data = b""
    sense: bytes = b""
    wanted: int = -1  # bytes of data-out the CDB called for (the frontend's residual), -1 when it took none
    moved: int = 0  # bytes a write or an unmap changed on the medium (a read's are its data)
    unmapped: bool = False  # a WRITE SAME that unmapped (it counts as an unmap, not a write)
    counted: bool = False  # already counted in the vdisk's I/O statistics (in C, by the fast path that did it)


@dataclass
class Nexus:
    """The initiator port a command came from (its I_T nexus) and what it may do to this unit."""

    name: str
    read_only: bool = False


@dataclass
class Disk:
    """A vdisk's logical unit. nblocks follows the agent's table, so a grow shows at once."""

    vdisk: int
    agent: Agent
    unit: pages.UnitInfo
    port: tuple[str, int] | None = None
    attentions: dict[str, list[UnitAttention]] = field(default_factory=dict)
    reserved_by: str | None = None
    comparing: list[tuple[int, int, asyncio.Event]] = field(default_factory=list)
    pr: Reservations = field(init=False)
    over_threshold: bool = False
    retired: bool = False  # its vdisk went (deleted, or no longer ready here): every command is refused

    def __post_init__(self) -> None:
        self.pr = Reservations(lambda nexus, condition: self.raise_attention(condition, nexus))

    @property
    def block_size(self) -> int:
        return self.unit.block_size

    @property
    def nblocks(self) -> int:
        volume = self.agent.volumes.get(self.vdisk)
        return volume.nblocks if volume is not None else 0

    def threshold(self, above: bool) -> None:
        """The pool crossed its warning threshold: up, every nexus hears it once (new ones on their first command)."""
        self.over_threshold = above
        if above:
            self.raise_attention(UnitAttention.SOFT_THRESHOLD)

    def raise_attention(self, condition: UnitAttention, nexus: str | None = None) -> None:
        """Queue a unit attention for one nexus, or for every nexus seen so far."""
        for name in [nexus] if nexus is not None else list(self.attentions):
            pending = self.attentions.setdefault(name, [])
            if condition not in pending:
                pending.append(condition)

    async def execute(self, nexus: Nexus, cdb: bytes, data_out: Data = b"") -> Reply:
        """Carry out one command; every failure becomes CHECK CONDITION with sense, never an exception."""
        try:
            if self.retired:
                raise lun_not_supported()  # a frontend still holding it must not reach whatever has its id now
            opcode = Op(cdb[0]) if cdb and cdb[0] in Op._value2member_map_ else None
            if opcode is None:
                raise invalid_opcode()
            pending = self.attentions.get(nexus.name)
            if pending is None:
                pending = self.attentions[nexus.name] = [UnitAttention.SOFT_THRESHOLD] if self.over_threshold else []
            if pending and opcode not in UA_EXEMPT:
                raise pending.pop(0).check_condition()
            if self.reserved_by not in (None, nexus.name) and opcode not in RESERVATION_EXEMPT:
                return Reply(Status.RESERVATION_CONFLICT)
            if self.pr.keys and opcode in (Op.RESERVE_6, Op.RESERVE_10, Op.RELEASE_6, Op.RELEASE_10):
                return Reply(Status.RESERVATION_CONFLICT)  # SPC-2 reservations do not mix with registrations
            if self.pr.reserved and opcode in PR_WRITES | PR_READS and self.pr.blocks(nexus.name, opcode in PR_WRITES):
                return Reply(Status.RESERVATION_CONFLICT)
            return await HANDLERS[opcode](self, nexus, cdb, data_out)
        except CheckCondition as condition:
            return self._check_condition(nexus, condition)
        except AgentIOError as exc:
            return self._agent_failed(nexus, exc, cdb[0])
        except (IndexError, struct.error):
            return self._check_condition(nexus, invalid_field(0))

    def execute_now(
        self, nexus: Nexus, cdb: bytes, data_out: Data, into: memoryview | None = None, arrived: int = 0
    ) -> Reply | None:
        """The fast path for READ/WRITE 10 and 16: the whole command, without a coroutine, when nothing needs one
        (no unit attention, reservation, compare in progress, FUA, or fault); None sends the caller to execute().
        A READ's data goes straight into `into` when it is given and large enough (the reply's data is then a view of
        it). With arrived (time.monotonic_ns() when the command came in), a READ or WRITE done here is counted in the
        vdisk's I/O statistics in C as it completes, and its reply says so (a read's bytes: all its blocks)."""
        if cdb[0] not in FAST_OPCODES or cdb[1] & 0xE8 or not self.fast_ready(nexus):
            return None
        opcode = cdb[0]
        try:
            lba, nblocks, at = self._lba_length(cdb)
            self._range(lba, nblocks)
            self._transfer(nblocks, at)
            if not nblocks:
                return None
            if opcode in (Op.READ_10, Op.READ_16):
                data = self.agent.read_now(self.vdisk, lba, nblocks, into, arrived)
                return None if data is None else Reply(data=data, counted=arrived != 0)
            if nexus.read_only or not self.unit.write_cache:
                return None
            wanted = nblocks * self.block_size
            view = memoryview(data_out).cast("B")
            if len(view) < wanted or not self.agent.write_now(self.vdisk, lba, view[:wanted], arrived):
                return None
            return Reply(wanted=wanted, moved=wanted, counted=arrived != 0)
        except CheckCondition as condition:
            return self._check_condition(nexus, condition)
        except AgentIOError as exc:
            return self._agent_failed(nexus, exc, cdb[0])
        except struct.error:
            return None

    def account(self, opcode: int, reply: Reply, arrived: int, sent: int) -> None:
        """Count a command once answered in the vdisk's I/O statistics (kept in C in its map table, which sorts it
        by opcode); arrived is when the frontend took it in, from time.monotonic_ns(); sent the bytes of
        data-in the initiator was given (a read's bytes: what the frontend sent, not what the reply held)."""
        volume = self.agent.volumes.get(self.vdisk) if not self.retired else None
        if volume is not None:
            volume.table.account_reply(opcode, reply.status, sent, reply.moved, reply.unmapped, arrived)

    def _agent_failed(self, nexus: Nexus, exc: AgentIOError, opcode: int) -> Reply:
        """The reply to an I/O the agent could not do: BUSY while the controller is unreachable (the initiator
        retries), else CHECK CONDITION with what happened."""
        if exc.reason is Reason.UNAVAILABLE:
            return Reply(Status.BUSY)
        return self._check_condition(nexus, _agent_error(exc, opcode))

    def fast_ready(self, nexus: Nexus) -> bool:
        """Whether plain READs and WRITEs from nexus may skip the checks execute() makes: no unit attention for it
        (a new nexus goes the slow way once, to be told of what is pending), no reservation, no compare running."""
        return not (self.attentions.get(nexus.name, True) or self.reserved_by is not None or self.pr.reserved
                    or self.comparing or self.retired)  # fmt: skip

    def _check_condition(self, nexus: Nexus, condition: CheckCondition) -> Reply:
        return Reply(Status.CHECK_CONDITION, sense=condition.sense)

    # -- checks --------------------------------------------------------------------------------------------

    def _range(self, lba: int, nblocks: int) -> None:
        if lba > self.nblocks or lba + nblocks > self.nblocks:
            raise lba_out_of_range()

    def _transfer(self, nblocks: int, length_byte: int) -> None:
        if nblocks > self.unit.max_transfer_blocks:
            raise invalid_field(length_byte)

    def _data(self, data_out: Data, nbytes: int, parameters: bool = False) -> memoryview:
        """The first nbytes of data-out; less than that is a parameter list length error for parameter lists."""
        view = memoryview(data_out).cast("B")
        if len(view) < nbytes:
            if parameters:
                raise parameter_list_length_error()
            raise CheckCondition(Key.ILLEGAL_REQUEST, 0x4B, 0x00, "data phase error: too little data-out")
        return view[:nbytes]

    @staticmethod
    def _protect(cdb: bytes) -> None:
        if cdb[1] & 0xE0:
            raise invalid_field(1, 5)

    def _writable(self, nexus: Nexus) -> None:
        if nexus.read_only:
            raise write_protected()

    # -- basic commands ------------------------------------------------------------------------------------

    async def test_unit_ready(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        return Reply()

    async def request_sense(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        if cdb[1] & 0x01:
            raise invalid_field(1, 0)  # descriptor format is not supported
        pending = self.attentions.get(nexus.name)
        # Sense of a failed command went back with it (autosense): only a pending unit attention is left to report.
        sense = pending.pop(0).check_condition().sense if pending else fixed_sense(Key.NO_SENSE, 0, 0)
        return Reply(data=sense[: cdb[4]])

    async def inquiry(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        allocation = struct.unpack_from(">H", cdb, 3)[0]
        if cdb[1] & 0xFE:
            raise invalid_field(1)
        if not cdb[1] & 0x01:
            if cdb[2]:
                raise invalid_field(2)
            return Reply(data=pages.standard_inquiry()[:allocation])
        page = pages.vpd_page(cdb[2], self.unit, self.port)
        if page is None:
            raise invalid_field(2)
        return Reply(data=page[:allocation])

    async def read_capacity_10(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        if cdb[8] & 0x01 == 0 and struct.unpack_from(">I", cdb, 2)[0]:
            raise invalid_field(2)  # an LBA without PMI
        last = min(self.nblocks - 1, 0xFFFFFFFF)
        return Reply(data=struct.pack(">II", last, self.block_size))

    async def service_action_in(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        action = cdb[1] & 0x1F
        allocation = struct.unpack_from(">I", cdb, 10)[0]
        if action == SA_READ_CAPACITY_16:
            lbp = 0xC0 if self.unit.thin else 0x00  # LBPME, LBPRZ
            data = struct.pack(">QIBBBB", self.nblocks - 1, self.block_size, 0, 0, lbp, 0).ljust(32, b"\0")
            return Reply(data=data[:allocation])
        if action == SA_GET_LBA_STATUS:
            return await self._get_lba_status(cdb, allocation)
        raise invalid_field(1)

    async def _get_lba_status(self, cdb: bytes, allocation: int) -> Reply:
        lba = struct.unpack_from(">Q", cdb, 2)[0]
        if lba >= self.nblocks:
            raise lba_out_of_range()
        if allocation < 24:
            return Reply(data=struct.pack(">I", 20)[:allocation])
        room = max((allocation - 8) // 16, 1)
        runs = await self.agent.provisioning(self.vdisk, lba, min(room, 64))
        descriptors = b"".join(struct.pack(">QIB3x", start, count, 0 if mapped else 1) for start, count, mapped in runs[:room])
        return Reply(data=(struct.pack(">I4x", len(descriptors) + 4) + descriptors)[:allocation])

    async def start_stop_unit(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        if cdb[4] & 0xF0 not in (0x00, 0x10, 0x30, 0xB0):
            raise invalid_field(4, 4)
        return Reply()

    async def prevent_allow(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        return Reply()

    async def maintenance_in(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        if cdb[1] & 0x1F != SA_REPORT_SUPPORTED_OPCODES:
            raise invalid_field(1)
        return Reply(data=_supported_opcodes(cdb))

    # -- mode pages ----------------------------------------------------------------------------------------

    async def mode_sense(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        six = cdb[0] == Op.MODE_SENSE_6
        dbd = cdb[1] & 0x08
        llbaa = not six and cdb[1] & 0x10
        control, page = cdb[2] >> 6, cdb[2] & 0x3F
        subpage = cdb[3]
        allocation = cdb[4] if six else struct.unpack_from(">H", cdb, 7)[0]
        if control == 3:
            raise CheckCondition(Key.ILLEGAL_REQUEST, 0x39, 0x00, "saving parameters not supported")
        if page == pages.PAGE_ALL and subpage in (0x00, 0xFF):
            body = b"".join(pages.mode_page(p, self.unit, control) for p in pages.MODE_PAGES)
        elif page in pages.MODE_PAGES and subpage == 0:
            body = pages.mode_page(page, self.unit, control)
        else:
            raise invalid_field(2 if subpage == 0 else 3)
        specific = (0x80 if nexus.read_only else 0) | 0x10  # WP, DPOFUA
        if dbd:
            blocks = b""
        elif llbaa:
            blocks = struct.pack(">QII", self.nblocks, 0, self.block_size)
        else:
            blocks = struct.pack(">II", min(self.nblocks, 0xFFFFFFFF), self.block_size & 0xFFFFFF)
        if six:
            header = struct.pack(">BBBB", 3 + len(blocks) + len(body), 0, specific, len(blocks))
        else:
            header = struct.pack(">HBBBBH", 6 + len(blocks) + len(body), 0, specific, 1 if llbaa else 0, 0, len(blocks))
        return Reply(data=(header + blocks + body)[:allocation])

    async def mode_select(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        six = cdb[0] == Op.MODE_SELECT_6
        length = cdb[4] if six else struct.unpack_from(">H", cdb, 7)[0]
        if cdb[1] & 0x01:
            raise invalid_field(1, 0)  # SP: pages cannot be saved
        if not cdb[1] & 0x10:
            raise invalid_field(1, 4)  # PF must be set: only SPC page formats are understood
        if length == 0:
            return Reply()
        params = bytes(self._data(data_out, length, parameters=True))
        header = 4 if six else 8
        if len(params) < header:
            raise parameter_list_length_error()
        blocks = params[3] if six else struct.unpack_from(">H", params, 6)[0]
        at = header + blocks
        if at > len(params):
            raise parameter_list_length_error()
        write_cache = self.unit.write_cache
        while at < len(params):
            if at + 2 > len(params):
                raise parameter_list_length_error()
            code, size = params[at] & 0x3F, params[at + 1]
            page = params[at : at + 2 + size]
            if len(page) != size + 2 or code not in pages.MODE_PAGES or params[at] & 0x40:
                raise invalid_parameter(at)
            current = pages.mode_page(code, self.unit, 0)
            if code == pages.PAGE_CACHING and len(page) == len(current):
                write_cache = bool(page[2] & 0x04)
                page = page[:2] + bytes([(page[2] & ~0x04) | (current[2] & 0x04)]) + page[3:]
            if page[2:] != current[2:]:
                raise invalid_parameter(at + 2)
            at += 2 + size
        if write_cache != self.unit.write_cache:
            if not write_cache:
                await self.agent.flush()
            self.unit.write_cache = write_cache
            for name in self.attentions:
                if name != nexus.name:
                    self.raise_attention(UnitAttention.MODE_PARAMETERS_CHANGED, name)
        return Reply()

    # -- reads and writes ----------------------------------------------------------------------------------

    @staticmethod
    def _lba_length(cdb: bytes) -> tuple[int, int, int]:
        """(lba, nblocks, the CDB byte where the transfer length starts) for the 6/10/12/16-byte READ/WRITE family."""
        size = len(cdb)
        if cdb[0] in (Op.READ_6, Op.WRITE_6):
            lba = struct.unpack_from(">I", cdb, 0)[0] & 0x1FFFFF
            return lba, cdb[4] or 256, 4
        if cdb[0] in (Op.READ_10, Op.WRITE_10, Op.WRITE_AND_VERIFY_10, Op.VERIFY_10, Op.PRE_FETCH_10, Op.SYNCHRONIZE_CACHE_10):
            return struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0], 7
        if size >= 12 and cdb[0] in (Op.READ_12, Op.WRITE_12, Op.WRITE_AND_VERIFY_12, Op.VERIFY_12):
            return struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">I", cdb, 6)[0], 6
        return struct.unpack_from(">Q", cdb, 2)[0], struct.unpack_from(">I", cdb, 10)[0], 10

    async def read(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        if cdb[0] != Op.READ_6:
            self._protect(cdb)
        lba, nblocks, at = self._lba_length(cdb)
        self._range(lba, nblocks)
        self._transfer(nblocks, at)
        if not nblocks:
            return Reply()
        return Reply(data=await self.agent.read(self.vdisk, lba, nblocks))

    async def write(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        return await self._write_command(nexus, cdb, data_out, verify=False)

    async def write_and_verify(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        return await self._write_command(nexus, cdb, data_out, verify=True)

    async def _write_command(self, nexus: Nexus, cdb: bytes, data_out: Data, verify: bool) -> Reply:
        """WRITE 6/10/12/16 and WRITE AND VERIFY 10/12/16 (whose data is durable before it answers: the verify)."""
        if cdb[0] != Op.WRITE_6:
            self._protect(cdb)
        lba, nblocks, at = self._lba_length(cdb)
        self._writable(nexus)
        self._range(lba, nblocks)
        self._transfer(nblocks, at)
        if verify and cdb[1] & 0x06 not in (0x00, 0x02):
            raise invalid_field(1, 1)
        wanted = nblocks * self.block_size
        data = self._whole_blocks(data_out, wanted)
        if len(data):
            fua = verify or (cdb[0] != Op.WRITE_6 and bool(cdb[1] & 0x08))
            await self._write(lba, data, fua)
        return Reply(wanted=wanted, moved=len(data))

    def _whole_blocks(self, data_out: Data, wanted: int) -> memoryview:
        """The whole blocks of data-out up to what the CDB asked for: an initiator that sent less writes less
        (and hears of the overflow in the residual), as LIO, tgt and libiscsi's tests expect."""
        view = memoryview(data_out).cast("B")[:wanted]
        return view[: len(view) - len(view) % self.block_size]

    async def _after_compares(self, lba: int, end: int) -> None:
        """Wait for every COMPARE AND WRITE in progress on blocks [lba, end) to end (that is what makes it atomic)."""
        for start, stop, done in list(self.comparing):
            if start < end and lba < stop:
                await done.wait()

    async def _write(self, lba: int, data: memoryview, fua: bool) -> None:
        await self._after_compares(lba, lba + len(data) // self.block_size)
        await self.agent.write(self.vdisk, lba, data, fua or not self.unit.write_cache)

    async def verify(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        self._protect(cdb)
        lba, nblocks, at = self._lba_length(cdb)
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk not in (0, 1):
            raise invalid_field(1, 1)
        self._range(lba, nblocks)
        self._transfer(nblocks, at)
        if not nblocks:
            return Reply()
        stored = await self.agent.read(self.vdisk, lba, nblocks)
        if bytchk:
            expected = self._data(data_out, nblocks * self.block_size)
            if stored != expected:
                raise miscompare(_first_difference(stored, expected))
            return Reply(wanted=len(expected))
        return Reply()

    async def compare_and_write(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        self._protect(cdb)
        lba = struct.unpack_from(">Q", cdb, 2)[0]
        nblocks = cdb[13]
        self._writable(nexus)
        if nblocks > pages.MAX_COMPARE_AND_WRITE_BLOCKS:
            raise invalid_field(13)
        self._range(lba, nblocks)
        if not nblocks:
            if len(memoryview(data_out)):
                raise invalid_field(13)  # data for a compare of no blocks: a length that wrapped past 255
            return Reply()
        nbytes = nblocks * self.block_size
        data = self._data(data_out, 2 * nbytes)
        end = lba + nblocks
        await self._after_compares(lba, end)
        entry = (lba, end, asyncio.Event())
        self.comparing.append(entry)
        try:
            stored = await self.agent.read(self.vdisk, lba, nblocks)
            if stored != data[:nbytes]:
                raise miscompare(_first_difference(stored, data[:nbytes]))
            await self.agent.write(self.vdisk, lba, data[nbytes:], not self.unit.write_cache)
        finally:
            self.comparing.remove(entry)
            entry[2].set()
        return Reply(wanted=2 * nbytes, moved=nbytes)

    async def write_same(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        sixteen = cdb[0] == Op.WRITE_SAME_16
        self._protect(cdb)
        if sixteen:
            lba, nblocks = struct.unpack_from(">QI", cdb, 2)
        else:
            lba, nblocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        unmap, anchor, ndob = cdb[1] & 0x08, cdb[1] & 0x10, sixteen and cdb[1] & 0x01
        self._writable(nexus)
        if anchor:
            raise invalid_field(1, 4)
        if ndob and not self.unit.ndob:
            raise invalid_field(1, 0)
        if nblocks == 0:
            raise invalid_field(10 if sixteen else 7)  # WSNZ is set in the block limits page
        if nblocks > self.unit.max_transfer_blocks:
            raise invalid_field(10 if sixteen else 7)
        self._range(lba, nblocks)
        block = bytes(self.block_size) if ndob else bytes(self._data(data_out, self.block_size))
        if unmap and not self.unit.thin:
            raise invalid_field(1, 3)
        unmapping = bool(unmap) and block == bytes(self.block_size)
        if unmapping:
            await self._unmap(lba, nblocks)
        else:
            await self._write(lba, memoryview(block * nblocks), False)
        return Reply(wanted=0 if ndob else self.block_size, moved=nblocks * self.block_size, unmapped=unmapping)

    async def _unmap(self, lba: int, nblocks: int) -> None:
        await self._after_compares(lba, lba + nblocks)
        await self.agent.unmap(self.vdisk, lba, nblocks)

    async def unmap(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        self._writable(nexus)
        if not self.unit.thin:
            raise invalid_opcode()
        if cdb[1] & 0x01:
            raise invalid_field(1, 0)  # ANCHOR
        length = struct.unpack_from(">H", cdb, 7)[0]
        if length == 0:
            return Reply()
        if length < 8:
            raise parameter_list_length_error()
        params = bytes(self._data(data_out, length, parameters=True))
        described = struct.unpack_from(">H", params, 2)[0]
        count = min(described, len(params) - 8) // 16
        if count > pages.MAX_UNMAP_DESCRIPTORS:
            raise invalid_parameter(2)
        extents = [struct.unpack_from(">QI", params, 8 + 16 * i) for i in range(count)]
        for lba, nblocks in extents:
            self._range(lba, nblocks)
        for lba, nblocks in extents:
            if nblocks:
                await self._unmap(lba, nblocks)
        return Reply(wanted=length, moved=sum(nblocks for _, nblocks in extents) * self.block_size)

    async def pre_fetch(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        lba, nblocks, _ = self._lba_length(cdb)
        self._range(lba, nblocks)
        return Reply(Status.CONDITION_MET)

    async def synchronize_cache(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        lba, nblocks, _ = self._lba_length(cdb)
        self._range(lba, nblocks)
        await self.agent.flush()
        return Reply()

    # -- SPC-2 reservations --------------------------------------------------------------------------------

    async def reserve(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        if cdb[1] & 0x01 or (cdb[0] == Op.RESERVE_10 and cdb[1] & 0x02):
            raise invalid_field(1, 0)  # extents and third-party reservations are obsolete
        if self.reserved_by not in (None, nexus.name):
            return Reply(Status.RESERVATION_CONFLICT)
        self.reserved_by = nexus.name
        return Reply()

    async def release(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        if cdb[1] & 0x01 or (cdb[0] == Op.RELEASE_10 and cdb[1] & 0x02):
            raise invalid_field(1, 0)
        if self.reserved_by == nexus.name:
            self.reserved_by = None
        return Reply()

    # -- persistent reservations ---------------------------------------------------------------------------

    async def persistent_reserve_in(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        return Reply(data=self.pr.read(cdb))

    async def persistent_reserve_out(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        length = struct.unpack_from(">I", cdb, 5)[0]
        params = bytes(memoryview(data_out).cast("B")[:length])
        if len(params) < min(length, 24):
            raise parameter_list_length_error()
        try:
            self.pr.out(nexus.name, cdb, params)
        except Conflict:
            return Reply(Status.RESERVATION_CONFLICT, wanted=length)
        return Reply(wanted=length)

    async def unsupported(self, nexus: Nexus, cdb: bytes, data_out: Data) -> Reply:
        raise invalid_opcode()

    def nexus_lost(self, nexus: str) -> None:
        """The initiator port logged out or its connection went: its reservation and its pending state go too."""
        if self.reserved_by == nexus:
            self.reserved_by = None
        self.attentions.pop(nexus, None)

    def reset(self) -> None:
        """LUN reset: reservations dropped, every nexus told so."""
        self.reserved_by = None
        for name in self.attentions:
            self.raise_attention(UnitAttention.BUS_DEVICE_RESET, name)


Handler = Callable[[Disk, Nexus, bytes, Data], Awaitable[Reply]]
HANDLERS: dict[Op, Handler] = {
    Op.TEST_UNIT_READY: Disk.test_unit_ready,
    Op.REQUEST_SENSE: Disk.request_sense,
    Op.INQUIRY: Disk.inquiry,
    Op.READ_CAPACITY_10: Disk.read_capacity_10,
    Op.SERVICE_ACTION_IN_16: Disk.service_action_in,
    Op.START_STOP_UNIT: Disk.start_stop_unit,
    Op.PREVENT_ALLOW_MEDIUM_REMOVAL: Disk.prevent_allow,
    Op.MAINTENANCE_IN: Disk.maintenance_in,
    Op.MODE_SENSE_6: Disk.mode_sense,
    Op.MODE_SENSE_10: Disk.mode_sense,
    Op.MODE_SELECT_6: Disk.mode_select,
    Op.MODE_SELECT_10: Disk.mode_select,
    Op.READ_6: Disk.read,
    Op.READ_10: Disk.read,
    Op.READ_12: Disk.read,
    Op.READ_16: Disk.read,
    Op.WRITE_6: Disk.write,
    Op.WRITE_10: Disk.write,
    Op.WRITE_12: Disk.write,
    Op.WRITE_16: Disk.write,
    Op.WRITE_AND_VERIFY_10: Disk.write_and_verify,
    Op.WRITE_AND_VERIFY_12: Disk.write_and_verify,
    Op.WRITE_AND_VERIFY_16: Disk.write_and_verify,
    Op.VERIFY_10: Disk.verify,
    Op.VERIFY_12: Disk.verify,
    Op.VERIFY_16: Disk.verify,
    Op.COMPARE_AND_WRITE: Disk.compare_and_write,
    Op.WRITE_SAME_10: Disk.write_same,
    Op.WRITE_SAME_16: Disk.write_same,
    Op.UNMAP: Disk.unmap,
    Op.PRE_FETCH_10: Disk.pre_fetch,
    Op.PRE_FETCH_16: Disk.pre_fetch,
    Op.SYNCHRONIZE_CACHE_10: Disk.synchronize_cache,
    Op.SYNCHRONIZE_CACHE_16: Disk.synchronize_cache,
    Op.RESERVE_6: Disk.reserve,
    Op.RESERVE_10: Disk.reserve,
    Op.RELEASE_6: Disk.release,
    Op.RELEASE_10: Disk.release,
    Op.PERSISTENT_RESERVE_IN: Disk.persistent_reserve_in,
    Op.PERSISTENT_RESERVE_OUT: Disk.persistent_reserve_out,
    Op.REPORT_LUNS: Disk.unsupported,
}
# CDB length per opcode group (SAM-5): the top three bits of the operation code.
CDB_LENGTH = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}


# Operation codes whose CDB carries a service action (byte 1, bits 4-0), and the actions supported.
SERVICE_ACTIONS: dict[int, tuple[int, ...]] = {
    Op.SERVICE_ACTION_IN_16: (SA_READ_CAPACITY_16, SA_GET_LBA_STATUS),
    Op.MAINTENANCE_IN: (SA_REPORT_SUPPORTED_OPCODES,),
    Op.PERSISTENT_RESERVE_IN: (0, 1, 2, 3),
    Op.PERSISTENT_RESERVE_OUT: (0, 1, 2, 3, 4, 5, 6, 7),
}


def _supported_opcodes(cdb: bytes) -> bytes:
    """REPORT SUPPORTED OPERATION CODES: all of them (option 0), or one (options 1-2) with its CDB usage bitmap;
    with RCTD, each with a command timeouts descriptor."""
    options, rctd = cdb[2] & 0x07, bool(cdb[2] & 0x80)
    requested, action = cdb[3], struct.unpack_from(">H", cdb, 4)[0]
    allocation = struct.unpack_from(">I", cdb, 6)[0]
    timeouts = struct.pack(">HBBII", 0x0A, 0, 0, 30, 60) if rctd else b""
    supported = [op for op, handler in HANDLERS.items() if handler is not Disk.unsupported]
    if options == 0:
        ctdp = 0x02 if rctd else 0
        body = b""
        for op in supported:
            for sa in SERVICE_ACTIONS.get(op, (None,)):
                flags = ctdp | (0x01 if sa is not None else 0)
                body += struct.pack(">BBHBBH", op, 0, sa or 0, 0, flags, CDB_LENGTH[op >> 5]) + timeouts
        return (struct.pack(">I", len(body)) + body)[:allocation]
    if options not in (1, 2):
        raise invalid_field(2)
    with_action = requested in SERVICE_ACTIONS
    if (options == 1 and with_action) or (options == 2 and not with_action):
        raise invalid_field(2)
    known = requested in supported and (not with_action or action in SERVICE_ACTIONS[requested])
    if not known:
        return struct.pack(">BBH", 0, 0x01, 0)[:allocation]
    length = CDB_LENGTH[requested >> 5]
    usage = bytes([requested]) + b"\xff" * (length - 2) + b"\x07"
    if with_action:
        usage = usage[:1] + bytes([0x1F]) + usage[2:]
    return (struct.pack(">BBH", 0, 0x03 | (0x80 if rctd else 0), length) + usage + timeouts)[:allocation]


def _first_difference(a: Data, b: Data) -> int:
    left, right = bytes(a), bytes(b)
    for index, (x, y) in enumerate(zip(left, right, strict=False)):
        if x != y:
            return index
    return min(len(left), len(right))


def _agent_error(exc: AgentIOError, opcode: int) -> CheckCondition:
    """The sense for an I/O the agent could not do: what happened, and for a medium error, which way it failed."""
    if exc.reason is Reason.NO_SPACE:
        return space_allocation_failed()
    if exc.reason is Reason.WRITE_PROTECTED:
        return write_protected()
    if exc.reason is Reason.OUT_OF_RANGE:
        return lba_out_of_range()
    if exc.reason is Reason.NO_VDISK:
        return lun_not_supported()
    if exc.reason is Reason.IO_ERROR and opcode in READING:
        return medium_error(str(exc))
    return write_error(str(exc))
