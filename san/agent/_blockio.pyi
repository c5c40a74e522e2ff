from san._fastmap import MapTable

FAULT: int
DONE: int
AGAIN: int

def read_blocks(
    table: MapTable, fds: object, lba: int, nblocks: int, out: bytearray | memoryview, nowait: bool = False, arrived_ns: int = 0
) -> int: ...
def write_blocks(
    table: MapTable,
    fds: object,
    lba: int,
    data: bytes | bytearray | memoryview,
    written: set[int],
    nowait: bool = False,
    arrived_ns: int = 0,
) -> int: ...

DIRECT: int

def read_at(fdv: int, out: bytearray | memoryview, offset: int) -> None: ...
def write_at(fdv: int, data: bytes | bytearray | memoryview, offset: int) -> None: ...
