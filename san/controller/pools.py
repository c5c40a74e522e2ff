"""Pools and their containers: which storage a pool may take, labels written and checked, containers claimed.

A container is known by its label, never by its path alone: on every open san checks that the label names this
store, this container and the epoch it last wrote, and holds the container exclusively while it serves it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
from typing import TYPE_CHECKING

from san.controller.allocator import PoolAllocator
from san.errors import Conflict, InvalidRequest, StoreFailure
from san.model import (
    DEFAULT_ALLOCATE_AHEAD,
    DEFAULT_SEGMENT_SIZE,
    DEFAULT_WARN_PERCENT,
    LABEL_SEGMENTS,
    MAX_CONTAINERS,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    Container,
    Pool,
    check_name,
)
from san.protocol.messages import Command, Op
from san.storage.containers import (
    ContainerError,
    check_unused_device,
    create_sparse_file,
    find_labeled_devices,
    inspect,
    wipe_label,
)
from san.storage.label import LABEL_BYTES, Label, LabelError, new_id, read_label, write_label
from san.storage.paths import UnsafePath, check_trusted, identity, unlink_nofollow
from san.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from san.controller.controller import Controller

log = logging.getLogger("san.controller")
MAX_SEGMENTS = 0xFFFFFFFF
POOLS_DIR = "pools"


def _identity(path: str) -> tuple[int, ...] | None:
    """What makes two paths the same store: the device number of a block device, else (st_dev, st_ino)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_rdev,) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


class PoolManager:
    """Creates, opens and deletes pools for one controller. New pool files go in DATA/pools or under an allowed
    directory (--allow-path), where an existing regular file may be taken over too; unused block devices may be
    taken anywhere."""

    def __init__(self, controller: Controller, allow_paths: tuple[str, ...] = ()) -> None:
        self.controller = controller
        self.data_dir = os.path.realpath(controller.data_dir)
        self.allow_paths = tuple(os.path.realpath(p) for p in allow_paths)

    # -- paths ---------------------------------------------------------------------------------------------

    def resolve(self, stored: str) -> str:
        """The path of a container as the store records it: relative ones are inside the data directory."""
        return stored if os.path.isabs(stored) else os.path.join(self.data_dir, stored)

    def stored(self, path: str) -> str:
        """How the store records a container path: relative when inside the data directory, so a copy of the data
        directory (cp -a, a restored backup) uses its own pool files and never the original's."""
        return os.path.relpath(path, self.data_dir) if _inside(path, self.data_dir) else path

    # -- opening at start ----------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the registries, then claim and check every container; a pool whose container cannot be used goes
        offline with one log line (its vdisks are not served), the others serve."""
        c = self.controller
        store = c.store
        c.pools = {pool.id: pool for pool in store.pools()}
        containers = store.containers()
        for pool in c.pools.values():
            c.allocators[pool.id] = PoolAllocator(
                ((k.id, k.nsegments) for k in containers if k.pool_id == pool.id), c.reserve_segments, LABEL_SEGMENTS
            )
        for container in containers:
            problem = self._open(container)
            if problem is not None and container.pool_id not in c.offline:
                name = c.pools[container.pool_id].name
                c.offline[container.pool_id] = f"container {container.id} ({container.path}): {problem}"
                log.error("pool %s is offline: container %d (%s): %s", name, container.id, container.path, problem)
        owner = {k.id: k.pool_id for k in containers}
        for container_id, pseg in store.used_segments():
            c.allocators[owner[container_id]].mark_used([(container_id, pseg)])
        c.vdisks = {vdisk.id: vdisk for vdisk in store.vdisks()}
        self._remove_interrupted({k.id for k in containers})

    def _remove_interrupted(self, known_ids: set[int]) -> None:
        """Pool files in DATA/pools that this store labelled for a container it never recorded are left by a pool
        create that was interrupted (killed between writing the label and committing): remove them. A file that
        is, or may be, a container of this store (same file as an open one, a known container id, locked) stays."""
        directory = os.path.join(self.data_dir, POOLS_DIR)
        if not os.path.isdir(directory):
            return
        known = {identity(fd) for fd in self.controller.containers.fds.values()}
        for container in self.controller.store.containers():
            with contextlib.suppress(OSError):
                st = os.stat(self.resolve(container.path))
                known.add((st.st_dev, st.st_ino))
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in known:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    label = read_label(fd)
                except (OSError, LabelError):
                    continue  # held by someone, or unreadable: not ours to judge
                ours = label is not None and label.store_id == self.controller.store.store_id
                if ours and label is not None and label.container_id not in known_ids:
                    why = f"its pool {label.pool_name!r} was being created when san stopped"
                elif label is None and st.st_blocks == 0:
                    why = "an empty pool file left when san stopped while creating it"  # never labelled nor written
                else:
                    log.warning("%s is not a container of this store; left alone", path)
                    continue
                unlink_nofollow(path, (st.st_dev, st.st_ino))  # this very file, while its lock is held
                log.info("removed %s: %s", path, why)
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)
            finally:
                os.close(fd)

    def _open(self, container: Container) -> str | None:
        """Claim a container and check its label (finding a block device by label when its path moved); take it
        over with a new epoch. The reason it cannot be used, or None."""
        c = self.controller
        pool = c.pools[container.pool_id]
        path = self.resolve(container.path)
        try:
            fd = c.containers.attach(container.id, path, claim=True)
            problem = self._check(container, fd)
        except ContainerError as exc:
            problem = str(exc)
        except (OSError, LabelError) as exc:
            problem = f"cannot read its label: {exc}"
        if problem is not None and container.kind == "device" and container.uuid:
            c.containers.detach(container.id)
            carriers = find_labeled_devices(container.uuid, c.store.store_id)
            if len(carriers) > 1:
                return f"{problem}; {' and '.join(carriers)} all carry its label (a clone or a snapshot?): san takes none"
            found = carriers[0] if carriers else None
            if found is None or found == path:
                return f"{problem}; no other block device carries its label"
            log.warning("container %d of pool %s moved: %s holds its label now (was %s)", container.id, pool.name, found, path)
            try:
                fd = c.containers.attach(container.id, found, claim=True)
                problem = self._check(container, fd)
            except (ContainerError, OSError, LabelError) as exc:
                problem = str(exc)
            if problem is None:
                container.path = found
        if problem is None and (not container.uuid or not container.epoch):
            problem = self._upgrade(container, pool)
        if problem is None:
            problem = self._size_problem(container, pool, fd)
        if problem is not None:
            c.containers.detach(container.id)
            return problem
        self._take_over(container, fd)
        return None

    def _check(self, container: Container, fd: int) -> str | None:
        label = read_label(fd)
        if not container.uuid or (not container.epoch and label is None):
            # From before labels (or its labelling was interrupted before the label was written): _upgrade labels it.
            return None if label is None else "it holds a san label the store does not know; it is not this store's"
        if label is None:
            return "it holds no san label: it is not this container (another disk or image is at its path?)"
        if label.store_id != self.controller.store.store_id:
            return f"its label belongs to another san store ({label.store_id})"
        if label.container_uuid != container.uuid or label.container_id != container.id:
            return f"its label is container {label.container_id} of pool {label.pool_name!r}, not this one"
        if label.epoch not in (container.epoch, container.epoch_next):
            return (
                "another copy of this store has used it since (a copied data directory or a restored backup?); "
                "serving it from here would corrupt it"
            )
        return None

    def _size_problem(self, container: Container, pool: Pool, fd: int) -> str | None:
        actual = os.lseek(fd, 0, os.SEEK_END)
        needed = container.nsegments * pool.segment_size
        return f"it has {actual} bytes, its segments need {needed}" if actual < needed else None

    def _upgrade(self, container: Container, pool: Pool) -> str | None:
        """A container from before labels: label it, if its first segment (which the label needs) holds no data."""
        c = self.controller
        if any(c.store.segment_used(container.id, pseg) for pseg in range(LABEL_SEGMENTS)):
            return "it has no label and its first segment holds data (it was made by an older san): move that vdisk first"
        fd = c.containers.fd(container.id)
        container.uuid = container.uuid or new_id()
        container.epoch, container.epoch_next = "", new_id()
        container.path = self.stored(self.resolve(container.path))
        c.metadata.commit(lambda store: store.update_container(container))  # recorded before the label is written
        write_label(fd, self._label(container, pool).with_epoch(container.epoch_next))
        container.epoch, container.epoch_next = container.epoch_next, ""
        c.metadata.commit(lambda store: store.update_container(container))
        log.info("container %d of pool %s labelled", container.id, pool.name)
        return None

    def _label(self, container: Container, pool: Pool) -> Label:
        return Label(
            self.controller.store.store_id,
            container.uuid,
            container.epoch,
            container.id,
            pool.id,
            pool.segment_size,
            container.nsegments,
            pool.name,
        )

    def _take_over(self, container: Container, fd: int) -> None:
        """Give the container a new epoch, recorded in the store before and after its label changes, so that a copy
        of this store that has not seen the new epoch refuses the container."""
        c = self.controller
        pool = c.pools[container.pool_id]
        container.epoch_next = new_id()
        container.path = self.stored(c.containers.paths[container.id])
        c.metadata.commit(lambda store: store.update_container(container))
        write_label(fd, self._label(container, pool).with_epoch(container.epoch_next))
        container.epoch, container.epoch_next = container.epoch_next, ""
        c.metadata.commit(lambda store: store.update_container(container))

    def close(self) -> None:
        """At a clean stop every online container gets a new epoch too, so a copy of the store taken while san ran
        (a backup of a live data directory) is refused when it is restored, rather than serving stale mappings."""
        c = self.controller
        for container in c.store.containers():
            fd = c.containers.fds.get(container.id)
            if fd is None or not c.online(container.pool_id):
                continue
            try:
                self._take_over(container, fd)
            except (OSError, StoreFailure) as exc:
                log.error("could not renew the epoch of container %d: %s", container.id, exc)

    # -- create and delete ---------------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        size: int | None = None,
        path: str | None = None,
        segment_size: int | None = None,
        warn_percent: int | None = None,
        allocate_ahead: int | None = None,
        existing: bool = False,
    ) -> Pool:
        """A pool on one container: a new sparse file (default under the data directory), an unused block device,
        or (with existing) a regular file under an allowed directory."""
        segment_size = DEFAULT_SEGMENT_SIZE if segment_size is None else segment_size
        warn_percent = DEFAULT_WARN_PERCENT if warn_percent is None else warn_percent
        allocate_ahead = DEFAULT_ALLOCATE_AHEAD if allocate_ahead is None else allocate_ahead
        check_name("pool", name)
        c = self.controller
        async with c.locks.hold(("pool", name), ("pool-create", "")):
            if any(p.name == name for p in c.pools.values()):
                raise Conflict(f"pool {name!r} already exists")
            if segment_size & (segment_size - 1) or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
                raise InvalidRequest(f"segment size {segment_size} must be a power of two from 64K to 1G")
            if not 1 <= warn_percent <= 100:
                raise InvalidRequest(f"warning threshold {warn_percent}% must be between 1 and 100")
            if not 0 <= allocate_ahead <= 1024:
                raise InvalidRequest(f"allocate-ahead {allocate_ahead} must be between 0 and 1024 segments")
            if size is not None and size < segment_size:
                raise InvalidRequest(f"pool size {size} is smaller than one segment ({segment_size} bytes)")
            if len(c.store.containers()) >= MAX_CONTAINERS:
                raise Conflict(f"san serves at most {MAX_CONTAINERS} containers")
            real = self._container_path(path or os.path.join(self.data_dir, POOLS_DIR, f"{name}.img"))
            kind, owned, size_bytes, nsegments, checked = self._plan(real, size, segment_size, existing)
            pool, container = await self._make(
                name, real, kind, owned, size_bytes, nsegments, segment_size, warn_percent, allocate_ahead, checked
            )
        c.pools[pool.id] = pool
        c.allocators[pool.id] = PoolAllocator([(container.id, nsegments)], c.reserve_segments, LABEL_SEGMENTS)
        await c.agents.broadcast(c.attach_command(container))
        c.low_reserve(pool.id)
        return pool

    async def _make(
        self,
        name: str,
        real: str,
        kind: str,
        owned: bool,
        size_bytes: int,
        nsegments: int,
        segment_size: int,
        warn_percent: int,
        allocate_ahead: int,
        checked: tuple[int, int] | None,
    ) -> tuple[Pool, Container]:
        """Claim (or create) the container, label it, record pool and container in one commit; on any failure
        nothing stays: a new file is removed, a label written on existing storage is wiped. The claimed container
        must be the very file or device _plan checked (checked: its identity), not one swapped in since."""
        c = self.controller
        container_id = c.store.next_container_id()
        labelled = False

        def change(store: SQLiteStore) -> tuple[Pool, Container]:
            nonlocal labelled
            pool = store.add_pool(name, segment_size, warn_percent, allocate_ahead)
            container = Container(
                container_id, pool.id, self.stored(real), kind, size_bytes, nsegments, owned, new_id(), new_id()
            )
            labelled = True
            write_label(fd, self._label(container, pool))
            return pool, store.add_container(container)

        created: tuple[int, int] | None = None
        try:
            if owned:
                created = checked = create_sparse_file(real, nsegments * segment_size)
            fd = c.containers.attach(container_id, real, claim=True)
            if kind == "file" and identity(fd) != checked:
                raise InvalidRequest(f"{real} was replaced while san was taking it; nothing was taken")
            if kind == "file" and not owned:
                os.fchmod(fd, 0o600)
            self._refuse_labelled(fd, real)
            return await c.metadata.commit_async(change)  # the label is written (and synced) in the metadata thread
        except BaseException as exc:
            if labelled and created is None and container_id in c.containers.fds:
                wipe_label(c.containers.fds[container_id])
            c.containers.detach(container_id)
            if created is not None:
                with contextlib.suppress(OSError):
                    unlink_nofollow(real, created)
            if isinstance(exc, ContainerError | LabelError):
                raise InvalidRequest(str(exc)) from None
            if isinstance(exc, OSError):
                raise InvalidRequest(f"cannot use {real}: {exc.strerror or exc}") from None
            raise

    def _refuse_labelled(self, fd: int, path: str) -> None:
        """Existing storage that holds a san label holds some store's data: never take it."""
        try:
            label = read_label(fd)
        except LabelError:
            raise Conflict(
                f"{path} holds a damaged san label: it may hold a pool's data; wipe its first {LABEL_BYTES} bytes to reuse it"
            ) from None
        if label is None:
            return
        if label.store_id == self.controller.store.store_id:
            if all(k.id != label.container_id for k in self.controller.store.containers()):
                log.info("%s holds the label of a pool create of this store that never completed: taking it", path)
                return
            raise Conflict(f"{path} already holds container {label.container_id} of pool {label.pool_name!r} of this store")
        raise Conflict(
            f"{path} belongs to another san store ({label.store_id}, pool {label.pool_name!r}); "
            f"wipe its first {LABEL_BYTES} bytes to reuse it"
        )

    def _plan(
        self, real: str, size: int | None, segment_size: int, existing: bool
    ) -> tuple[str, bool, int, int, tuple[int, int] | None]:
        """(kind, owned, size in bytes, segments, identity of what was checked) for a new container at real, or the
        reason it is refused."""
        directory = os.path.dirname(real)
        pools_dir = os.path.join(self.data_dir, POOLS_DIR)
        if not os.path.lexists(real):
            if size is None:
                raise InvalidRequest(f"{real} does not exist: give --size to create it")
            self._trusted(real, "new pool files")
            if not os.path.isdir(directory):
                if directory != pools_dir:
                    raise InvalidRequest(f"directory {directory} does not exist")
                os.makedirs(directory, mode=0o700, exist_ok=True)
            nsegments = size // segment_size + LABEL_SEGMENTS
            fs = os.statvfs(directory)
            if nsegments * segment_size > fs.f_blocks * fs.f_frsize:
                raise InvalidRequest(f"{size} bytes is more than the whole file system under {directory}")
            return "file", True, nsegments * segment_size, self._segments(nsegments, size), None
        try:
            st, actual = inspect(real)
        except ContainerError as exc:
            raise InvalidRequest(str(exc)) from None
        if stat.S_ISBLK(st.st_mode):
            try:
                check_unused_device(real)
            except ContainerError as exc:
                raise Conflict(str(exc)) from None
            kind = "device"
        elif stat.S_ISREG(st.st_mode):
            self._check_existing_file(real, st, existing)
            kind = "file"
        else:
            raise InvalidRequest(f"{real} is neither a regular file nor a block device")
        if size is None:
            size = actual
        elif size > actual:
            raise InvalidRequest(f"{real} has {actual} bytes, less than the {size} asked for")
        nsegments = size // segment_size
        return kind, False, size, self._segments(nsegments, size), (st.st_dev, st.st_ino)

    def _trusted(self, real: str, what: str) -> None:
        """A pool file goes in DATA/pools or under an allowed directory, in directories nobody else can change."""
        directory = os.path.dirname(real)
        pools_dir = os.path.join(self.data_dir, POOLS_DIR)
        if directory == pools_dir:
            return
        top = next((allowed for allowed in self.allow_paths if _inside(directory, allowed)), None)
        if top is None:
            allowed = ", ".join(self.allow_paths) or "none"
            raise InvalidRequest(
                f"{real} is not under a directory allowed for {what} ({pools_dir}, or san serve --allow-path DIR;"
                f" allowed: {allowed})"
            )
        try:
            check_trusted(directory, top)
        except (UnsafePath, OSError) as exc:
            raise InvalidRequest(str(exc)) from None

    @staticmethod
    def _segments(nsegments: int, size: int) -> int:
        if nsegments <= LABEL_SEGMENTS or nsegments > MAX_SEGMENTS:
            raise InvalidRequest(
                f"a container holds 2 to {MAX_SEGMENTS} segments (the first holds its label), {size} bytes give {nsegments}"
            )
        return nsegments

    def _check_existing_file(self, real: str, st: os.stat_result, existing: bool) -> None:
        """An existing regular file is taken over only when asked for, never a program, never one that is not ours
        or has other names, and only under a directory the admin allowed."""
        if not existing:
            raise Conflict(f"{real} already exists; to take it over and overwrite its contents, give --existing")
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            raise InvalidRequest(f"{real} is setuid or setgid: san never takes over a program")
        if st.st_mode & 0o111:
            raise InvalidRequest(f"{real} is executable: san never takes over a program")
        if st.st_nlink != 1:
            raise InvalidRequest(f"{real} has {st.st_nlink} hard links: other names would still reach its data")
        if st.st_uid != os.geteuid():
            raise InvalidRequest(f"{real} belongs to uid {st.st_uid}, not to the user san runs as")
        self._trusted(real, "existing files")

    def _container_path(self, path: str) -> str:
        """The real path of a new container, refused if it is another container under another name or in the data
        directory outside its pools directory."""
        if "\0" in path:
            raise InvalidRequest("a path cannot contain a NUL byte")
        if len(path) > 4096:
            raise InvalidRequest("a path is at most 4096 characters")
        real = os.path.realpath(path)
        if _inside(real, self.data_dir) and os.path.dirname(real) != os.path.join(self.data_dir, POOLS_DIR):
            raise InvalidRequest(
                f"{real} is inside the data directory {self.data_dir}; pool files belong in {self.data_dir}/pools"
            )
        identity = _identity(real)
        c = self.controller
        for container in c.store.containers():
            other = c.containers.paths.get(container.id) or self.resolve(container.path)
            if other == real or (identity is not None and _identity(other) == identity):
                raise Conflict(f"{real} is already a container of a pool (as {other})")
        return real

    async def delete(self, name: str) -> None:
        c = self.controller
        async with c.locks.hold(("pool", name)):
            pool = c.pool(name)
            allocator = c.allocators[pool.id]
            while allocator.in_flight:
                await asyncio.sleep(0.01)
            users = sorted(v.name for v in c.vdisks.values() if v.pool_id == pool.id)
            if users:
                raise Conflict(f"pool {name!r} still has vdisks: {', '.join(users)}")
            online = c.online(pool.id)
            containers = c.pool_containers(pool)
            await c.metadata.commit_async(lambda store: store.delete_pool(pool.id))
            for container in containers:
                await c.agents.broadcast(Command(Op.DETACH_CONTAINER, container=container.id), check=False)
                fd = c.containers.fds.get(container.id)
                if online and fd is not None and not container.owned:
                    wipe_label(fd)  # the storage is no longer this store's: it may be taken again
                if online and container.owned and fd is not None:
                    try:
                        unlink_nofollow(c.containers.paths[container.id], identity(fd))
                    except OSError as exc:
                        log.warning("pool %s deleted; its file stays: %s", name, exc)
                c.containers.detach(container.id)
            del c.pools[pool.id]
            del c.allocators[pool.id]
            c.offline.pop(pool.id, None)

    def require_online(self, pool: Pool) -> None:
        problem = self.controller.offline.get(pool.id)
        if problem is not None:
            raise Conflict(f"pool {pool.name!r} is offline: {problem}")
