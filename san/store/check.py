"""Offline consistency check of a data directory's store, like thin_check: reads only, reports every problem.

The tables: reference counts (of mappings, their alternate locations and the versions snapshots keep), segment bounds,
sharing only inside a version set, snapshots of existing vdisks, free + used = capacity. The containers: present, long
enough, and carrying this store's label for that container at the epoch the store last wrote."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from san.model import LABEL_SEGMENTS
from san.storage.label import LabelError, read_label
from san.store.store import SCHEMA_VERSION


def check_store(path: str) -> tuple[list[str], list[str]]:
    """(problems, summary lines) for the store at path and its containers; no problems means clean."""
    problems, summary = check_tables(path)
    if problems and not summary:
        return problems, summary
    return problems + check_containers(path), summary


def check_tables(path: str) -> tuple[list[str], list[str]]:
    """(problems, summary lines) of the store's tables alone."""
    try:
        with _readonly(path) as db:
            return _check_tables(db)
    except _Unreadable as exc:
        return [str(exc)], []


def check_containers(path: str) -> list[str]:
    """Problems of the containers a store lists (files, sizes, labels)."""
    try:
        with _readonly(path) as db:
            return _check_containers(db, os.path.dirname(os.path.abspath(path)))
    except _Unreadable as exc:
        return [str(exc)]


class _Unreadable(Exception):
    """The store itself is missing or cannot be read."""


@contextlib.contextmanager
def _readonly(path: str) -> Iterator[sqlite3.Connection]:
    if not os.path.exists(path):
        raise _Unreadable(f"no store at {path}")
    try:
        db = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise _Unreadable(f"store {path} cannot be read: {exc}") from None
    try:
        yield db
    except sqlite3.DatabaseError as exc:
        raise _Unreadable(f"store {path} cannot be read: {exc}") from None
    finally:
        db.close()


def _version_problem(db: sqlite3.Connection) -> str | None:
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if version is None or int(version[0]) not in (1, 2, 3, SCHEMA_VERSION):
        return f"schema version {version and version[0]} is not {SCHEMA_VERSION}"
    return None


def _check_tables(db: sqlite3.Connection) -> tuple[list[str], list[str]]:
    problem = _version_problem(db)
    if problem is not None:
        return [problem], []
    problems: list[str] = []
    pools = {row[0]: (row[1], row[2]) for row in db.execute("SELECT id, name, segment_size FROM pool")}
    version = int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    uuid = "uuid" if version >= 3 else "''"
    containers = {
        row[0]: {"pool": row[1], "path": row[2], "size": row[3], "nsegments": row[4], "label": LABEL_SEGMENTS if row[5] else 0}
        for row in db.execute(f"SELECT id, pool_id, path, size_bytes, nsegments, {uuid} FROM container")
    }
    origin = "origin_id, generation, block_size" if version >= 4 else "0, 0, block_size"
    vdisks = {
        row[0]: {
            "name": row[1], "pool": row[2], "size": row[3], "thin": bool(row[4]), "state": row[5], "origin": row[6],
            "generation": row[7], "block_size": row[8],
        }
        for row in db.execute(f"SELECT id, name, pool_id, size_bytes, thin, state, {origin} FROM vdisk")
    }  # fmt: skip
    for v in vdisks.values():
        if v["origin"] and v["origin"] not in vdisks:
            problems.append(f"snapshot {v['name']} is of a missing vdisk {v['origin']}")
        elif v["origin"] and v["generation"] >= vdisks[v["origin"]]["generation"]:
            problems.append(f"snapshot {v['name']} sees generation {v['generation']}, not older than its vdisk's")
    for cid, c in containers.items():
        if c["pool"] not in pools:
            problems.append(f"container {cid} ({c['path']}) belongs to missing pool {c['pool']}")
            continue
        segment_size = pools[c["pool"]][1]
        if c["nsegments"] * segment_size > c["size"]:
            problems.append(f"container {cid} claims {c['nsegments']} segments, more than its {c['size']} bytes hold")

    references: Counter[tuple[int, int]] = Counter()
    owners: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    mapped: Counter[int] = Counter()
    for vdisk_id, vseg, cid, pseg, what in _holders(db, version):
        vdisk = vdisks.get(vdisk_id)
        if vdisk is None:
            problems.append(f"mapping of missing vdisk {vdisk_id} (segment {vseg})")
            continue
        if vdisk["origin"]:
            problems.append(f"snapshot {vdisk['name']} has mappings of its own (segment {vseg})")
        if what == "mapping":
            mapped[vdisk_id] += 1
        container = containers.get(cid)
        if container is None:
            problems.append(f"vdisk {vdisk['name']} segment {vseg} points at missing container {cid}")
            continue
        if container["pool"] != vdisk["pool"]:
            problems.append(f"vdisk {vdisk['name']} segment {vseg} points into another pool's container {cid}")
        segment_size = pools[vdisk["pool"]][1] if vdisk["pool"] in pools else 1
        if not 0 <= vseg < -(-vdisk["size"] // segment_size):
            problems.append(f"vdisk {vdisk['name']} has a mapping for segment {vseg}, beyond its size")
        if not 0 <= pseg < container["nsegments"]:
            problems.append(
                f"vdisk {vdisk['name']} segment {vseg} points outside container {cid}"
                f" (segment {pseg} of {container['nsegments']})"
            )
        elif pseg < container["label"]:
            problems.append(f"vdisk {vdisk['name']} segment {vseg} points at the label of container {cid}")
        references[(cid, pseg)] += 1
        owners[(cid, pseg)].add(vdisk_id)
    if version >= 4:
        problems += _bitmap_problems(db, vdisks, pools)

    counted: dict[tuple[int, int], int] = {}
    for cid, pseg, refcount in db.execute("SELECT container_id, pseg, refcount FROM segment"):
        counted[(cid, pseg)] = refcount
        if cid not in containers:
            problems.append(f"segment {pseg} of missing container {cid} is marked used")
        elif not 0 <= pseg < containers[cid]["nsegments"]:
            problems.append(f"segment {pseg} of container {cid} is marked used but lies outside it")
        if references[(cid, pseg)] != refcount:
            problems.append(f"container {cid} segment {pseg}: reference count {refcount}, but {references[(cid, pseg)]} mappings")
    for key, count in references.items():
        if key not in counted:
            problems.append(f"container {key[0]} segment {key[1]} is mapped {count} time(s) but marked free")
        if len(owners[key]) > 1:
            names = sorted(vdisks[v]["name"] for v in owners[key])
            problems.append(f"container {key[0]} segment {key[1]} is shared outside its version set: {', '.join(names)}")

    summary: list[str] = []
    for pool_id, (name, _) in sorted(pools.items()):
        capacity = sum(max(c["nsegments"] - c["label"], 0) for c in containers.values() if c["pool"] == pool_id)
        used = sum(1 for (cid, _) in counted if containers.get(cid, {}).get("pool") == pool_id)
        free = capacity - used
        if free < 0:
            problems.append(f"pool {name}: {used} segments used, more than its capacity of {capacity}")
        summary.append(f"pool {name}: capacity {capacity} segments = used {used} + free {free}")
    for vdisk_id, vdisk in vdisks.items():
        if vdisk["pool"] not in pools:
            problems.append(f"vdisk {vdisk['name']} belongs to missing pool {vdisk['pool']}")
            continue
        nsegments = -(-vdisk["size"] // pools[vdisk["pool"]][1])
        if not vdisk["thin"] and vdisk["state"] == "ready" and mapped[vdisk_id] != nsegments:
            problems.append(f"thick vdisk {vdisk['name']} maps {mapped[vdisk_id]} of its {nsegments} segments")
    snapshots = sum(1 for v in vdisks.values() if v["origin"])
    summary.append(f"{len(vdisks) - snapshots} vdisks, {snapshots} snapshots, {sum(mapped.values())} mapped segments")
    return problems, summary


def _holders(db: sqlite3.Connection, version: int) -> Iterable[tuple[int, int, int, int, str]]:
    """Every reference to a physical segment: (vdisk, vdisk segment, container, segment, what holds it)."""
    if version < 4:
        for vdisk_id, vseg, cid, pseg in db.execute("SELECT vdisk_id, vseg, container_id, pseg FROM mapping"):
            yield vdisk_id, vseg, cid, pseg, "mapping"
        return
    columns = "vdisk_id, vseg, container_id, pseg, alt_container, alt_pseg, bitmap"
    for table in ("mapping", "retained"):
        for vdisk_id, vseg, cid, pseg, alt_cid, alt_pseg, bitmap in db.execute(f"SELECT {columns} FROM {table}"):
            yield vdisk_id, vseg, cid, pseg, table
            if bitmap is not None:
                yield vdisk_id, vseg, alt_cid, alt_pseg, f"{table} alternate"


def _bitmap_problems(db: sqlite3.Connection, vdisks: dict[int, dict[str, int]], pools: dict[int, tuple[str, int]]) -> list[str]:
    """Alternate locations whose bitmap is not one bit per block of the segment."""
    problems = []
    for table in ("mapping", "retained"):
        for vdisk_id, vseg, bitmap in db.execute(f"SELECT vdisk_id, vseg, bitmap FROM {table} WHERE bitmap IS NOT NULL"):
            vdisk = vdisks.get(vdisk_id)
            if vdisk is None or vdisk["pool"] not in pools:
                continue
            blocks = pools[vdisk["pool"]][1] // vdisk["block_size"]
            if len(bitmap) != (blocks + 7) // 8:
                problems.append(f"vdisk {vdisk['name']} segment {vseg}: a {len(bitmap)}-byte bitmap for {blocks} blocks")
    return problems


def _check_containers(db: sqlite3.Connection, data_dir: str) -> list[str]:
    if _version_problem(db) is not None:
        return []
    labelled = int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]) >= 3
    store_id = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone() if labelled else None
    sizes = dict(db.execute("SELECT id, segment_size FROM pool").fetchall())
    columns = "id, pool_id, path, nsegments" + (", uuid, epoch, epoch_next" if labelled else "")
    problems: list[str] = []
    for row in db.execute(f"SELECT {columns} FROM container ORDER BY id"):
        cid, pool_id, stored, nsegments = row[:4]
        path = stored if os.path.isabs(stored) else os.path.join(data_dir, stored)
        segment_size = sizes.get(pool_id)
        if segment_size is None:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            problems.append(f"container {cid}: {path} is missing")
            continue
        except OSError as exc:
            problems.append(f"container {cid}: {path} cannot be read: {exc.strerror}")
            continue
        try:
            actual = os.lseek(fd, 0, os.SEEK_END)
            if actual < nsegments * segment_size:
                problems.append(f"container {cid}: {path} has {actual} bytes, segments need {nsegments * segment_size}")
            if labelled and store_id is not None:
                label_problem = _label_problem(fd, store_id[0], cid, row[4], (row[5], row[6]))
                if label_problem is not None:
                    problems.append(f"container {cid}: {path}: {label_problem}")
        except OSError as exc:
            problems.append(f"container {cid}: {path} cannot be read: {exc.strerror}")
        finally:
            os.close(fd)
    return problems


def _label_problem(fd: int, store_id: str, cid: int, uuid: str, epochs: tuple[str, str]) -> str | None:
    try:
        label = read_label(fd)
    except LabelError as exc:
        return str(exc)
    if not uuid:
        return None if label is None else "holds a san label the store does not know"
    if label is None:
        return "holds no san label (another disk or image is at its path?)"
    if label.store_id != store_id:
        return f"its label belongs to another san store ({label.store_id})"
    if label.container_uuid != uuid or label.container_id != cid:
        return f"its label is container {label.container_id} of pool {label.pool_name!r}"
    if label.epoch not in epochs:
        return "another copy of this store has used it since (a copied data directory or a restored backup?)"
    return None
