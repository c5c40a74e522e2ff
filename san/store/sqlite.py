"""The embedded store: SQLite in WAL mode; writes only inside a transaction the metadata object opens, reads beside it.

SQL is kept portable (no SQLite-only statements outside open()), for a PostgreSQL store beside it later."""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from san.model import Container, Host, Pool, VDisk, Zone
from san.store.store import SCHEMA_VERSION, Mapping, StoreError

SCHEMA = [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE pool (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        segment_size BIGINT NOT NULL,
        warn_percent INTEGER NOT NULL,
        allocate_ahead INTEGER NOT NULL)""",
    """CREATE TABLE container (
        id INTEGER PRIMARY KEY,
        pool_id INTEGER NOT NULL REFERENCES pool(id),
        path TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        nsegments BIGINT NOT NULL,
        owned INTEGER NOT NULL)""",
    """CREATE TABLE vdisk (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        pool_id INTEGER NOT NULL REFERENCES pool(id),
        size_bytes BIGINT NOT NULL,
        block_size INTEGER NOT NULL,
        thin INTEGER NOT NULL,
        serial TEXT NOT NULL,
        state TEXT NOT NULL)""",
    """CREATE TABLE mapping (
        vdisk_id INTEGER NOT NULL REFERENCES vdisk(id),
        vseg BIGINT NOT NULL,
        container_id INTEGER NOT NULL REFERENCES container(id),
        pseg BIGINT NOT NULL,
        state INTEGER NOT NULL,
        PRIMARY KEY (vdisk_id, vseg))""",
    "CREATE INDEX mapping_physical ON mapping (container_id, pseg)",
    """CREATE TABLE segment (
        container_id INTEGER NOT NULL REFERENCES container(id),
        pseg BIGINT NOT NULL,
        refcount INTEGER NOT NULL,
        PRIMARY KEY (container_id, pseg))""",
]
# Version 2: hosts and their zones.
SCHEMA_V2 = [
    """CREATE TABLE host (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        iqn TEXT NOT NULL UNIQUE,
        chap_user TEXT NOT NULL,
        chap_secret TEXT NOT NULL,
        mutual_user TEXT NOT NULL,
        mutual_secret TEXT NOT NULL)""",
    """CREATE TABLE zone (
        host_id INTEGER NOT NULL REFERENCES host(id),
        vdisk_id INTEGER NOT NULL REFERENCES vdisk(id),
        lun INTEGER NOT NULL,
        read_only INTEGER NOT NULL,
        PRIMARY KEY (host_id, vdisk_id),
        UNIQUE (host_id, lun))""",
]
# Version 3: container labels (uuid, takeover epochs) and the store's own id.
SCHEMA_V3 = [
    "ALTER TABLE container ADD COLUMN uuid TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE container ADD COLUMN epoch TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE container ADD COLUMN epoch_next TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX segment_unreferenced ON segment (refcount) WHERE refcount <= 0",
]
# Version 4: version sets. A snapshot is a vdisk row with origin_id (the vdisk it is of) and the generation of its
# origin it sees; a mapping has an alternate location with its block bitmap (copy on write), the generation it was
# written in (birth) and the one its primary location came in (pbirth); the versions of mappings that a snapshot
# still sees after the vdisk moved on are kept in `retained`, each with the generation it ended in (death).
SCHEMA_V4 = [
    "ALTER TABLE vdisk ADD COLUMN origin_id INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE vdisk ADD COLUMN generation BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE vdisk ADD COLUMN created TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE mapping ADD COLUMN alt_container INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE mapping ADD COLUMN alt_pseg BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE mapping ADD COLUMN bitmap BLOB",
    "ALTER TABLE mapping ADD COLUMN birth BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE mapping ADD COLUMN pbirth BIGINT NOT NULL DEFAULT 0",
    """CREATE TABLE retained (
        vdisk_id INTEGER NOT NULL REFERENCES vdisk(id),
        vseg BIGINT NOT NULL,
        death BIGINT NOT NULL,
        container_id INTEGER NOT NULL REFERENCES container(id),
        pseg BIGINT NOT NULL,
        state INTEGER NOT NULL,
        alt_container INTEGER NOT NULL,
        alt_pseg BIGINT NOT NULL,
        bitmap BLOB,
        birth BIGINT NOT NULL,
        pbirth BIGINT NOT NULL,
        PRIMARY KEY (vdisk_id, vseg, death))""",
    "CREATE INDEX vdisk_origin ON vdisk (origin_id)",
]
UPGRADES = {1: SCHEMA_V2 + SCHEMA_V3 + SCHEMA_V4, 2: SCHEMA_V3 + SCHEMA_V4, 3: SCHEMA_V4}
_MAPPING = "vseg, container_id, pseg, state, alt_container, alt_pseg, bitmap, birth, pbirth"
_VDISK = "SELECT id, name, pool_id, size_bytes, block_size, thin, serial, state, origin_id, generation, created FROM vdisk"
_CONTAINER = "SELECT id, pool_id, path, kind, size_bytes, nsegments, owned, uuid, epoch, epoch_next FROM container"


class SQLiteStore:
    """Store on one SQLite file (`san.db` in the data directory), created mode 0600.

    begin(), commit() and rollback() belong to the metadata object (san/store/metadata.py); every write method
    refuses to run outside the transaction it opened, or in another thread than the one that opened it. Reads inside
    that thread's transaction see its changes; every other read goes to a second connection that sees the last commit
    and never waits for one in flight (WAL readers do not block on the writer)."""

    def __init__(self, path: str, create: bool = True) -> None:
        exists = os.path.exists(path)
        if not exists and not create:
            raise StoreError(f"no store at {path}")
        if not exists:
            try:
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            except OSError as exc:
                raise StoreError(f"cannot create store {path}: {exc.strerror}") from None
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None
        self.path = path
        self.in_transaction = False
        self.owner = 0  # the thread whose transaction is open
        if "meta" not in tables:
            if tables:
                raise StoreError(f"{path} is not a san store")
            self.begin()
            for statement in SCHEMA + SCHEMA_V2 + SCHEMA_V3 + SCHEMA_V4:
                self.db.execute(statement)
            self.db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (str(uuid.uuid4()),))
            self.commit()
        version = int(self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        if version in UPGRADES and create:
            self.begin()
            for statement in UPGRADES[version]:
                self.db.execute(statement)
            self.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            self.db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (str(uuid.uuid4()),))
            self.commit()
            version = SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path} has schema version {version}; this san understands version {SCHEMA_VERSION}")
        self.schema_version = version
        self.store_id: str = self.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
        try:
            self.reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.reader.execute("PRAGMA query_only=ON")
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise StoreError(f"cannot open store {path}: {exc}") from None

    # -- the transaction (metadata.py only) ----------------------------------------------------------------

    def begin(self) -> None:
        if self.in_transaction:
            raise StoreError("a metadata transaction is already open")
        self.db.execute("BEGIN IMMEDIATE")
        self.owner = threading.get_ident()  # before the flag: another thread must never see the flag with its own id
        self.in_transaction = True

    def commit(self) -> None:
        try:
            self.db.execute("COMMIT")
        finally:
            self.in_transaction = self.db.in_transaction
            if not self.in_transaction:
                self.owner = 0

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.in_transaction = False
        self.owner = 0

    def close(self) -> None:
        self.rollback()
        self.reader.close()
        self.db.close()

    def _write(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        self._writing()
        return self.db.execute(sql, params)

    def _writing(self) -> None:
        if not self.in_transaction or self.owner != threading.get_ident():
            raise StoreError("store written outside a metadata transaction")

    def _reads(self) -> sqlite3.Connection:
        return self.db if self.in_transaction and self.owner == threading.get_ident() else self.reader

    # -- pools and containers ------------------------------------------------------------------------------

    def add_pool(self, name: str, segment_size: int, warn_percent: int, allocate_ahead: int) -> Pool:
        cursor = self._write(
            "INSERT INTO pool (name, segment_size, warn_percent, allocate_ahead) VALUES (?, ?, ?, ?)",
            (name, segment_size, warn_percent, allocate_ahead),
        )
        assert cursor.lastrowid is not None
        return Pool(cursor.lastrowid, name, segment_size, warn_percent, allocate_ahead)

    def pools(self) -> list[Pool]:
        rows = self._reads().execute("SELECT id, name, segment_size, warn_percent, allocate_ahead FROM pool ORDER BY name")
        return [Pool(*row) for row in rows]

    def delete_pool(self, pool_id: int) -> None:
        self._write("DELETE FROM container WHERE pool_id = ?", (pool_id,))
        self._write("DELETE FROM pool WHERE id = ?", (pool_id,))

    def add_container(self, container: Container) -> Container:
        """Insert a container (its id is chosen here unless it is given, non-zero)."""
        cursor = self._write(
            "INSERT INTO container (id, pool_id, path, kind, size_bytes, nsegments, owned, uuid, epoch, epoch_next)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                container.id or None,
                container.pool_id,
                container.path,
                container.kind,
                container.size_bytes,
                container.nsegments,
                int(container.owned),
                container.uuid,
                container.epoch,
                container.epoch_next,
            ),
        )
        assert cursor.lastrowid is not None
        return Container(**{**container.to_dict(), "id": cursor.lastrowid})

    def next_container_id(self) -> int:
        return int(self._reads().execute("SELECT COALESCE(MAX(id), 0) + 1 FROM container").fetchone()[0])

    def update_container(self, container: Container) -> None:
        """Record a container's path, label uuid and epochs."""
        self._write(
            "UPDATE container SET path = ?, uuid = ?, epoch = ?, epoch_next = ? WHERE id = ?",
            (container.path, container.uuid, container.epoch, container.epoch_next, container.id),
        )

    def containers(self, pool_id: int | None = None) -> list[Container]:
        rows = (
            self._reads().execute(_CONTAINER + " ORDER BY id")
            if pool_id is None
            else self._reads().execute(_CONTAINER + " WHERE pool_id = ? ORDER BY id", (pool_id,))
        )
        return [Container(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8], r[9]) for r in rows]

    # -- vdisks and their mappings -------------------------------------------------------------------------

    def add_vdisk(self, name: str, pool_id: int, size_bytes: int, block_size: int, thin: bool, state: str) -> VDisk:
        serial = os.urandom(8).hex()
        cursor = self._write(
            "INSERT INTO vdisk (name, pool_id, size_bytes, block_size, thin, serial, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, pool_id, size_bytes, block_size, int(thin), serial, state),
        )
        assert cursor.lastrowid is not None
        return VDisk(cursor.lastrowid, name, pool_id, size_bytes, block_size, thin, serial, state)

    def add_snapshot(self, origin: VDisk, name: str, created: str) -> VDisk:
        """A snapshot of origin at its current generation; the origin goes on in the next one."""
        serial = os.urandom(8).hex()
        values = (name, origin.pool_id, origin.size_bytes, origin.block_size, int(origin.thin), serial, origin.id)
        cursor = self._write(
            "INSERT INTO vdisk (name, pool_id, size_bytes, block_size, thin, serial, state, origin_id, generation, created)"
            " VALUES (?, ?, ?, ?, ?, ?, 'ready', ?, ?, ?)",
            (*values, origin.generation, created),
        )
        self._write("UPDATE vdisk SET generation = ? WHERE id = ?", (origin.generation + 1, origin.id))
        assert cursor.lastrowid is not None
        return VDisk(
            cursor.lastrowid, name, origin.pool_id, origin.size_bytes, origin.block_size, origin.thin, serial, "ready",
            origin.id, origin.generation, created,
        )  # fmt: skip

    def vdisks(self) -> list[VDisk]:
        rows = self._reads().execute(_VDISK + " ORDER BY name")
        vdisks = [VDisk(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9], r[10]) for r in rows]
        born = dict(self._reads().execute("SELECT vdisk_id, MAX(birth) FROM mapping GROUP BY vdisk_id").fetchall())
        for vdisk in vdisks:  # a generation whose snapshot never committed may have written mappings: go on past it
            if not vdisk.origin and born.get(vdisk.id, 0) > vdisk.generation:
                vdisk.generation = born[vdisk.id]
        return vdisks

    def update_vdisk(self, vdisk: VDisk) -> None:
        self._write("UPDATE vdisk SET size_bytes = ?, state = ? WHERE id = ?", (vdisk.size_bytes, vdisk.state, vdisk.id))

    def delete_vdisk(self, vdisk_id: int) -> None:
        self._write("DELETE FROM vdisk WHERE id = ?", (vdisk_id,))

    def mappings(self, vdisk_id: int, start: int, stop: int) -> list[Mapping]:
        rows = self._reads().execute(
            f"SELECT {_MAPPING} FROM mapping WHERE vdisk_id = ? AND vseg >= ? AND vseg < ? ORDER BY vseg",
            (vdisk_id, start, stop),
        )
        return [Mapping(*row) for row in rows]

    def snapshot_mappings(self, origin_id: int, generation: int, start: int, stop: int) -> list[Mapping]:
        """The mappings of origin's segments [start, stop) as they were in that generation (a snapshot's view):
        the kept versions that ended after it, and the current ones written in it or before."""
        rows = self._reads().execute(
            f"SELECT {_MAPPING} FROM retained WHERE vdisk_id = ? AND vseg >= ? AND vseg < ? AND birth <= ? AND death > ?"
            f" UNION ALL SELECT {_MAPPING} FROM mapping WHERE vdisk_id = ? AND vseg >= ? AND vseg < ? AND birth <= ?"
            " ORDER BY vseg",
            (origin_id, start, stop, generation, generation, origin_id, start, stop, generation),
        )
        return [Mapping(*row) for row in rows]

    def snapshot_generations(self, origin_id: int) -> list[int]:
        """The generations the snapshots of a vdisk see, oldest first."""
        rows = self._reads().execute("SELECT generation FROM vdisk WHERE origin_id = ? ORDER BY generation", (origin_id,))
        return [row[0] for row in rows]

    def retaining(self) -> list[int]:
        """The vdisks that keep versions of their mappings for snapshots."""
        return [row[0] for row in self._reads().execute("SELECT DISTINCT vdisk_id FROM retained")]

    def drop_unseen(self, origin_id: int, limit: int) -> tuple[int, list[tuple[int, int]]]:
        """Drop up to `limit` kept versions of origin's mappings that no snapshot sees any more; how many went, and
        the physical segments whose last reference went with them."""
        self._writing()
        rows = self.db.execute(
            "SELECT vseg, death, container_id, pseg, alt_container, alt_pseg, bitmap FROM retained r WHERE vdisk_id = ?"
            " AND NOT EXISTS (SELECT 1 FROM vdisk s WHERE s.origin_id = r.vdisk_id AND s.generation >= r.birth"
            " AND s.generation < r.death) LIMIT ?",
            (origin_id, limit),
        ).fetchall()
        self.db.executemany(
            "DELETE FROM retained WHERE vdisk_id = ? AND vseg = ? AND death = ?", [(origin_id, r[0], r[1]) for r in rows]
        )
        return len(rows), self._unreference(_references(rows, 2))

    def set_mapping_state(self, vdisk_id: int, start: int, stop: int, state: int) -> None:
        self._write("UPDATE mapping SET state = ? WHERE vdisk_id = ? AND vseg >= ? AND vseg < ?", (state, vdisk_id, start, stop))

    def count_mappings(self, vdisk_id: int) -> int:
        return int(self._reads().execute("SELECT COUNT(*) FROM mapping WHERE vdisk_id = ?", (vdisk_id,)).fetchone()[0])

    def add_mappings(self, vdisk_id: int, mappings: Iterable[Mapping]) -> None:
        """Map unmapped vdisk segments and take a reference on each physical segment (primary and alternate)."""
        self._writing()
        rows = list(mappings)
        self.db.executemany(
            f"INSERT INTO mapping (vdisk_id, {_MAPPING}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(vdisk_id, *m) for m in rows],
        )
        self.db.executemany(
            "INSERT INTO segment (container_id, pseg, refcount) VALUES (?, ?, 1)"
            " ON CONFLICT (container_id, pseg) DO UPDATE SET refcount = segment.refcount + 1",
            _references([(m.container_id, m.pseg, m.alt_container, m.alt_pseg, m.bitmap) for m in rows], 0),
        )

    def remove_mappings(self, vdisk_id: int, start: int, stop: int) -> list[tuple[int, int]]:
        """Unmap vdisk segments [start, stop); the physical segments whose last reference went."""
        return self.remove_mapping_ranges(vdisk_id, [(start, stop)])

    def remove_mapping_ranges(
        self, vdisk_id: int, ranges: Iterable[tuple[int, int]], collect: bool = True
    ) -> list[tuple[int, int]]:
        """Unmap the vdisk segments of each range [start, stop); the physical segments whose last reference went. A
        mapping a snapshot still sees (written in its generation or before) is kept for it, with its references.
        Without collect, nothing is returned yet: mappings added next may take the same segments again (an
        alternate location's new blocks), and unreferenced() says afterwards which are free."""
        self._writing()
        seen = self.db.execute("SELECT MAX(generation) FROM vdisk WHERE origin_id = ?", (vdisk_id,)).fetchone()[0]
        now = self.db.execute("SELECT generation FROM vdisk WHERE id = ?", (vdisk_id,)).fetchone()
        gone: list[tuple[int, int, int, int, bytes | None]] = []
        for start, stop in ranges:
            where = (vdisk_id, start, stop)
            if seen is not None and now is not None:
                self.db.execute(
                    f"INSERT INTO retained (vdisk_id, death, {_MAPPING}) SELECT vdisk_id, ?, {_MAPPING} FROM mapping"
                    " WHERE vdisk_id = ? AND vseg >= ? AND vseg < ? AND birth <= ?",
                    (now[0], *where, seen),
                )
            kept = seen if seen is not None else -1
            gone += self.db.execute(
                "SELECT container_id, pseg, alt_container, alt_pseg, bitmap FROM mapping"
                " WHERE vdisk_id = ? AND vseg >= ? AND vseg < ? AND birth > ?",
                (*where, kept),
            ).fetchall()
            self.db.execute("DELETE FROM mapping WHERE vdisk_id = ? AND vseg >= ? AND vseg < ?", where)
        self._decrement(_references(gone, 0))
        return self.unreferenced() if collect else []

    def delete_retained(self, vdisk_id: int) -> list[tuple[int, int]]:
        """Drop every kept version of a vdisk's mappings (it is being deleted, with its snapshots)."""
        self._writing()
        rows = self.db.execute(
            "SELECT container_id, pseg, alt_container, alt_pseg, bitmap FROM retained WHERE vdisk_id = ?", (vdisk_id,)
        ).fetchall()
        self.db.execute("DELETE FROM retained WHERE vdisk_id = ?", (vdisk_id,))
        return self._unreference(_references(rows, 0))

    def _unreference(self, gone: list[tuple[int, int]]) -> list[tuple[int, int]]:
        self._decrement(gone)
        return self.unreferenced()

    def _decrement(self, gone: list[tuple[int, int]]) -> None:
        self.db.executemany("UPDATE segment SET refcount = refcount - 1 WHERE container_id = ? AND pseg = ?", gone)

    def unreferenced(self) -> list[tuple[int, int]]:
        """The physical segments no mapping references any more, dropped from the space map: free."""
        self._writing()
        # Sorted here: ORDER BY in SQL would walk the whole space map by its key instead of the partial index.
        freed = sorted(self.db.execute("SELECT container_id, pseg FROM segment WHERE refcount <= 0").fetchall())
        self.db.execute("DELETE FROM segment WHERE refcount <= 0")
        return [(c, p) for c, p in freed]

    def used_segments(self) -> Iterator[tuple[int, int]]:
        yield from self._reads().execute("SELECT container_id, pseg FROM segment")

    def segment_used(self, container_id: int, pseg: int) -> bool:
        row = self._reads().execute("SELECT 1 FROM segment WHERE container_id = ? AND pseg = ?", (container_id, pseg)).fetchone()
        return row is not None

    def segment_counts(self) -> dict[int, int]:
        rows = self._reads().execute("SELECT container_id, COUNT(*) FROM segment GROUP BY container_id")
        return {container_id: count for container_id, count in rows}

    # -- hosts and zones -----------------------------------------------------------------------------------

    def add_host(self, name: str, iqn: str, chap: tuple[str, str, str, str]) -> Host:
        cursor = self._write(
            "INSERT INTO host (name, iqn, chap_user, chap_secret, mutual_user, mutual_secret) VALUES (?, ?, ?, ?, ?, ?)",
            (name, iqn, *chap),
        )
        assert cursor.lastrowid is not None
        return Host(cursor.lastrowid, name, iqn, *chap)

    def hosts(self) -> list[Host]:
        rows = self._reads().execute(
            "SELECT id, name, iqn, chap_user, chap_secret, mutual_user, mutual_secret FROM host ORDER BY name"
        )
        return [Host(*row) for row in rows]

    def delete_host(self, host_id: int) -> None:
        self._write("DELETE FROM host WHERE id = ?", (host_id,))

    def update_host(self, host: Host) -> None:
        self._write(
            "UPDATE host SET iqn = ?, chap_user = ?, chap_secret = ?, mutual_user = ?, mutual_secret = ? WHERE id = ?",
            (host.iqn, host.chap_user, host.chap_secret, host.mutual_user, host.mutual_secret, host.id),
        )

    def update_zone(self, zone: Zone) -> None:
        self._write(
            "UPDATE zone SET lun = ?, read_only = ? WHERE host_id = ? AND vdisk_id = ?",
            (zone.lun, int(zone.read_only), zone.host_id, zone.vdisk_id),
        )

    def rename_vdisk(self, vdisk_id: int, name: str) -> None:
        self._write("UPDATE vdisk SET name = ? WHERE id = ?", (name, vdisk_id))

    def add_zone(self, zone: Zone) -> None:
        self._write(
            "INSERT INTO zone (host_id, vdisk_id, lun, read_only) VALUES (?, ?, ?, ?)",
            (zone.host_id, zone.vdisk_id, zone.lun, int(zone.read_only)),
        )

    def zones(self) -> list[Zone]:
        rows = self._reads().execute("SELECT host_id, vdisk_id, lun, read_only FROM zone ORDER BY host_id, lun")
        return [Zone(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def delete_zone(self, host_id: int, vdisk_id: int) -> None:
        self._write("DELETE FROM zone WHERE host_id = ? AND vdisk_id = ?", (host_id, vdisk_id))


def _references(rows: Iterable[Sequence[Any]], at: int) -> list[tuple[int, int]]:
    """The physical segments rows hold from column `at` on: (container, pseg, alt container, alt pseg, bitmap); the
    alternate location counts only when the bitmap is there."""
    found: list[tuple[int, int]] = []
    for row in rows:
        container, pseg, alt_container, alt_pseg, bitmap = row[at : at + 5]
        found.append((container, pseg))
        if bitmap is not None:
            found.append((alt_container, alt_pseg))
    return found
