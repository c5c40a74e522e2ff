"""The child of the crash test: writes, unmaps, flushes, deletes and creates vdisks until it is killed.

Before each step it appends an intent line to a journal, and after each step a done line, so the parent
knows what may and what must have survived the SIGKILL."""

import asyncio
import os
import random
import sys

from san.model import MIB
from san.service import Service

VDISK_SIZE = 4 * MIB
BLOCK = 512


def pattern(name: str, lba: int, gen: int) -> bytes:
    return f"{name}:{lba}:{gen}:".encode().ljust(BLOCK, bytes([gen % 251 + 1]))


class Journal:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def log(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


async def main(data: str, journal_path: str, seed: int) -> None:
    rng = random.Random(seed)
    journal = Journal(journal_path)
    service = Service(data, commit_interval=0.05, reserve_segments=8)
    await service.start()
    c = service.controller
    if not c.pools:
        await c.create_pool("p", 96 * MIB, segment_size=64 * 1024, allocate_ahead=2)
    names = sorted(v.name for v in c.vdisks.values() if v.state == "ready")
    counter = int(seed) * 1000
    gen = seed * 1_000_000
    journal.log("READY")
    while True:
        op = rng.random()
        if len(names) < 2 or (op < 0.03 and len(names) < 6):
            counter += 1
            name = f"v{counter}"
            thick = rng.random() < 0.2
            journal.log(f"C {name}")
            vdisk = await c.create_vdisk(name, "p", VDISK_SIZE, thin=not thick)
            if thick:
                await c.finish_thick(vdisk)
            names.append(name)
            journal.log(f"CE {name}")
        elif op < 0.05 and len(names) > 2:
            name = names.pop(rng.randrange(len(names)))
            journal.log(f"D {name}")
            await c.delete_vdisk(name)
            journal.log(f"DE {name}")
        elif op < 0.15:
            journal.log("F")
            await service.agent.flush()
            journal.log("FE")
        elif op < 0.22:
            name = rng.choice(names)
            vdisk = c.vdisk(name)
            count = rng.choice([7, 128, 300, 700])
            lba = rng.randrange(0, vdisk.nblocks - count)
            journal.log(f"W {name} {lba} {count} 0 0")  # an unmap reads back as zeros, like a write of zeros
            if vdisk.thin:
                await service.agent.unmap(vdisk.id, lba, count)
            else:
                await service.agent.write(vdisk.id, lba, bytes(count * BLOCK))
            journal.log("WE")
        else:
            name = rng.choice(names)
            vdisk = c.vdisk(name)
            count = rng.choice([1, 1, 2, 8, 64, 300])
            lba = rng.randrange(0, vdisk.nblocks - count)
            gen += 1
            zero = rng.random() < 0.1
            data_out = bytes(count * BLOCK) if zero else b"".join(pattern(name, lba + i, gen) for i in range(count))
            fua = rng.random() < 0.1
            journal.log(f"W {name} {lba} {count} {0 if zero else gen} {int(fua)}")
            await service.agent.write(vdisk.id, lba, data_out, fua=fua)
            journal.log("WE")
        await asyncio.sleep(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
