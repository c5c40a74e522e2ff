"""A pool on a real block device (a loop device over a file full of old data), not a file.

The device's old bytes must never show through a vdisk, and deleting the pool leaves the device alone."""

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopdev import loop_device as loop_device_over

from san.model import MIB
from san.service import Service


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    backing = tmp_path / "disk.img"
    backing.write_bytes(b"\xee" * (32 * MIB))
    with loop_device_over(backing) as device:
        yield device


def test_pool_on_a_block_device_never_shows_its_old_bytes(tmp_path: Path, loop_device: str) -> None:
    async def body() -> None:
        service = Service(str(tmp_path / "data"))
        await service.start()
        try:
            c = service.controller
            pool = await c.create_pool("dev", path=loop_device, segment_size=MIB)
            container = c.pool_containers(pool)[0]
            assert container.kind == "device" and not container.owned
            assert c.usage(pool).capacity_bytes == 31 * MIB, "the first segment holds the label"
            thin = await c.create_vdisk("thin", "dev", 8 * MIB)
            await service.agent.write(thin.id, 3, b"new".ljust(512, b"."))
            data = bytes(await service.agent.read(thin.id, 0, 2048))
            assert data[3 * 512 : 4 * 512] == b"new".ljust(512, b".")
            assert b"\xee" not in data
            thick = await c.create_vdisk("thick", "dev", 8 * MIB, thin=False)
            await c.finish_thick(thick)
            assert bytes(await service.agent.read(thick.id, 0, 16384)) == bytes(8 * MIB)
            await service.agent.flush()
            await c.delete_vdisk("thin")
            await c.delete_vdisk("thick")
            await c.delete_pool("dev")
        finally:
            await service.stop()

    asyncio.run(body())
    assert os.path.exists(loop_device)
