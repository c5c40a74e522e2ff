from collections.abc import Mapping

from san.iscsi.connection import Task
from san.scsi.disk import Reply
from san.scsi.luns import Zoned

def header(
    opcode: int,
    flags: int,
    data_length: int,
    lun: int,
    itt: int,
    w20: int = 0,
    w24: int = 0,
    w28: int = 0,
    w32: int = 0,
    w36: int = 0,
    w40: int = 0,
    w44: int = 0,
    byte2: int = 0,
    byte3: int = 0,
) -> bytes: ...
def command_fields(bhs: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int]: ...
def account(luns: Mapping[int, Zoned], task: Task, reply: Reply) -> None: ...
