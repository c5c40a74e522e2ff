"""Group commit and nothing slow on the event loop: concurrent SYNCHRONIZE CACHEs share one data flush and one
metadata commit, and the loop serves other I/O while an fdatasync or a commit waits for the disk.

The slow disk is the one fault injected: os.fdatasync made to wait (a real fsync here takes microseconds)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from san.errors import StoreFailure
from san.groupcommit import GroupCommit
from san.service import Service
from san.store.sqlite import SQLiteStore

MIB = 1 << 20


class Work:
    """A step that records when each run began and can be held or made to fail."""

    def __init__(self) -> None:
        self.began: list[int] = []
        self.release = asyncio.Event()
        self.fail_next = False

    async def __call__(self) -> None:
        self.began.append(len(self.began))
        await self.release.wait()
        self.release.clear()
        if self.fail_next:
            self.fail_next = False
            raise OSError("flush failed")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_callers_during_a_run_share_the_next_one() -> None:
    async def body() -> None:
        work = Work()
        group = GroupCommit(work)
        first = asyncio.ensure_future(group())
        await settle()
        followers = [asyncio.ensure_future(group()) for _ in range(7)]
        await settle()
        assert len(work.began) == 1, "one run at a time"
        work.release.set()
        await first
        assert not any(f.done() for f in followers), "a run that began before a call does not answer it"
        await settle()
        assert len(work.began) == 2, "the seven callers share one run"
        work.release.set()
        await asyncio.gather(*followers)
        assert group.runs == 2

    asyncio.run(body())


def test_a_failed_run_fails_only_the_callers_it_covered() -> None:
    async def body() -> None:
        work = Work()
        group = GroupCommit(work)
        covered = asyncio.ensure_future(group())
        await settle()
        later = asyncio.ensure_future(group())
        await settle()
        work.fail_next = True
        work.release.set()
        with pytest.raises(OSError):
            await covered
        await settle()
        assert not later.done() and len(work.began) == 2, "a later caller gets a run of its own"
        work.release.set()
        await later
        assert group.covered == 2

    asyncio.run(body())


def test_a_cancelled_caller_does_not_cancel_the_run() -> None:
    async def body() -> None:
        work = Work()
        group = GroupCommit(work)
        impatient = asyncio.ensure_future(group())
        await settle()
        patient = asyncio.ensure_future(group())
        await settle()
        impatient.cancel()
        await settle()
        work.release.set()
        await settle()
        work.release.set()
        await patient
        assert impatient.cancelled() and group.runs == 2

    asyncio.run(body())


def test_concurrent_flushes_share_one_fdatasync_and_one_commit(tmp_path: Path) -> None:
    async def body() -> None:
        service = Service(str(tmp_path / "data"))
        await service.start()
        try:
            c, agent = service.controller, service.agent
            await c.create_pool("p", 64 * MIB)
            v = await c.create_vdisk("v", "p", 32 * MIB)
            for i in range(8):
                await agent.write(v.id, i * 2048, bytes([i + 1]) * 512)  # eight new segments
            await agent.flush()
            for i in range(8):
                await agent.write(v.id, i * 2048 + 1, bytes([i + 1]) * 512)
            data, commits = agent.data_flush.runs, c.metadata.commits
            await asyncio.gather(*(agent.flush() for _ in range(8)))
            assert agent.data_flush.runs - data == 2, "eight flushes: the one that started, and one for the rest"
            assert c.metadata.commits - commits <= 2
            for i in range(8):
                assert await agent.read(v.id, i * 2048, 2) == bytes([i + 1]) * 1024
        finally:
            await service.stop()

    asyncio.run(body())


def test_the_loop_serves_reads_while_a_flush_waits_for_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdatasync
    slow = threading.Event()

    def fdatasync(fd: int) -> None:
        if slow.is_set():
            time.sleep(0.5)  # a disk that takes its time
        real(fd)

    async def body() -> None:
        service = Service(str(tmp_path / "data"))
        await service.start()
        try:
            c, agent = service.controller, service.agent
            await c.create_pool("p", 64 * MIB)
            v = await c.create_vdisk("v", "p", 32 * MIB)
            await agent.write(v.id, 0, b"x" * 512)
            await agent.flush()
            await agent.write(v.id, 1, b"y" * 512)
            monkeypatch.setattr(os, "fdatasync", fdatasync)
            slow.set()
            flushing = asyncio.ensure_future(agent.flush())
            await asyncio.sleep(0.05)
            assert await agent.read(v.id, 0, 2) == b"x" * 512 + b"y" * 512
            assert not flushing.done(), "the read was answered while the flush still waited for the disk"
            await flushing
        finally:
            slow.clear()
            await service.stop()

    asyncio.run(body())


def test_a_fua_write_is_answered_only_once_its_new_mapping_is_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sequence that once acknowledged too early: a FUA write allocates and syncs its data slowly; meanwhile a
    SYNCHRONIZE CACHE starts a metadata commit. The write must wait for a commit that covers its mapping."""
    real = os.fdatasync
    calls: list[int] = []

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            time.sleep(0.5)  # the FUA write's own sync: slow
        real(fd)

    async def body() -> None:
        service = Service(str(tmp_path / "data"))
        await service.start()
        try:
            c, agent = service.controller, service.agent
            await c.create_pool("p", 64 * MIB)
            v = await c.create_vdisk("v", "p", 32 * MIB)
            await asyncio.sleep(0.1)
            store = c.metadata.store
            held, entered = threading.Event(), threading.Event()
            commit = store.commit

            def slow_commit() -> None:
                entered.set()
                held.wait(10)
                commit()

            monkeypatch.setattr(os, "fdatasync", fdatasync)
            fua = asyncio.ensure_future(agent.write(v.id, 4096, b"f" * 512, fua=True))  # a new segment
            await asyncio.sleep(0.05)
            monkeypatch.setattr(store, "commit", slow_commit)
            flushing = asyncio.ensure_future(agent.flush())
            assert await asyncio.to_thread(entered.wait, 10), "the flush's commit began"
            await asyncio.sleep(0.8)  # the FUA write's data is synced by now
            assert not fua.done(), "a FUA write is not answered before the commit that makes its mapping durable"
            monkeypatch.setattr(store, "commit", commit)
            held.set()
            await fua
            await flushing
            assert c.mappings(v.id, 2, 3), "its mapping is in the store"
        finally:
            await service.stop()

    asyncio.run(body())


def before_commits(store: SQLiteStore, step: Callable[[], None]) -> None:
    """Run step (in whatever thread commits) before each of the store's commits: the slow or failing disk."""
    real = store.commit

    def commit() -> None:
        step()
        real()

    store.commit = commit  # type: ignore[method-assign]


def test_the_loop_serves_reads_while_a_management_commit_waits_for_the_disk(tmp_path: Path) -> None:
    """Pool, vdisk, host and zone changes commit in the metadata thread: I/O is answered meanwhile. (The slow disk:
    the store's commit, which fsyncs, made to wait.)"""
    slow = threading.Event()

    async def body() -> None:
        service = Service(str(tmp_path / "data"))
        await service.start()
        try:
            c, agent = service.controller, service.agent
            await c.create_pool("p", 64 * MIB)
            v = await c.create_vdisk("v", "p", 32 * MIB)
            await agent.write(v.id, 0, b"x" * 512)
            await agent.flush()

            def slowly() -> None:
                if slow.is_set():
                    assert threading.current_thread() is not threading.main_thread(), "a commit on the event loop"
                    time.sleep(0.5)

            before_commits(c.store, slowly)
            slow.set()
            changes = {
                "pool create": c.create_pool("q", 64 * MIB),
                "vdisk create": c.create_vdisk("w", "p", 16 * MIB),
                "host create": c.zoning.create_host("h", "iqn.2024-01.org.example:h"),
                "zone add": c.zoning.add("h", "v"),
                "vdisk delete": c.delete_vdisk("w"),
            }
            for what, change in changes.items():
                running = asyncio.ensure_future(change)
                await asyncio.sleep(0.05)
                assert await agent.read(v.id, 0, 1) == b"x" * 512
                assert not running.done(), f"a read was answered while {what} waited for the disk"
                await running
            assert c.vdisk("v") and [z.lun for z in c.zoning.zones] == [0] and "q" in {p.name for p in c.pools.values()}
        finally:
            slow.clear()
            await service.stop()

    asyncio.run(body())


def test_a_flush_waiting_for_a_failed_management_commit_still_succeeds(tmp_path: Path) -> None:
    """A host create whose commit fails (the store refuses it once) while an agent's flush waits for it: the create
    fails alone; the flush commits the agent's mapping itself and succeeds (hosts see no SYNCHRONIZE CACHE error)."""
    failing = threading.Event()

    async def body() -> None:
        service = Service(str(tmp_path / "data"))
        await service.start()
        try:
            c, agent = service.controller, service.agent
            await c.create_pool("p", 64 * MIB)
            v = await c.create_vdisk("v", "p", 32 * MIB)

            def refuse_once() -> None:
                if failing.is_set():
                    failing.clear()
                    time.sleep(0.3)
                    raise sqlite3.OperationalError("disk I/O error")

            before_commits(c.store, refuse_once)
            await agent.write(v.id, 0, b"x" * 512)  # a new mapping, pending in the controller
            failing.set()
            creating = asyncio.ensure_future(c.zoning.create_host("h", "iqn.2024-01.org.example:h"))
            await asyncio.sleep(0.05)
            await agent.flush()
            with pytest.raises(StoreFailure):
                await creating
            assert c.metadata.pending == 0, "the flush committed the mapping"
        finally:
            await service.stop()
        restarted = Service(str(tmp_path / "data"))
        await restarted.start()
        try:
            assert await restarted.agent.read(restarted.controller.vdisk("v").id, 0, 1) == b"x" * 512
        finally:
            await restarted.stop()

    asyncio.run(body())
