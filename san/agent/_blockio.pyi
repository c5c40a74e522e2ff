from san._fastmap import MapTable

FAULT: int
DONE: int
AGAIN: int

def read_blocks(
    table: MapTable, fds: object, lba: int, nblocks: int, out: bytearray | memoryview, nowait: bool = False
) -> int: ...
def write_blocks(table: MapTable, fds: object, lba: int, data: bytes | bytearray | memoryview, written: set[int]) -> int: ...
