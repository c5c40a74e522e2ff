"""Offline consistency check of a data directory's store, like thin_check: reads only, reports every problem.

Checks reference counts, segment bounds, sharing across vdisks, container sizes and free + used = capacity."""

from __future__ import annotations

import os
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path

from san.store.store import SCHEMA_VERSION


def check_store(path: str) -> tuple[list[str], list[str]]:
    """(problems, summary lines) for the store at path; no problems means clean."""
    if not os.path.exists(path):
        return [f"no store at {path}"], []
    db = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return _check(db)
    except sqlite3.DatabaseError as exc:
        return [f"store {path} cannot be read: {exc}"], []
    finally:
        db.close()


def _check(db: sqlite3.Connection) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if version is None or int(version[0]) not in (1, SCHEMA_VERSION):
        return [f"schema version {version and version[0]} is not {SCHEMA_VERSION}"], []
    pools = {row[0]: (row[1], row[2]) for row in db.execute("SELECT id, name, segment_size FROM pool")}
    containers = {
        row[0]: {"pool": row[1], "path": row[2], "size": row[3], "nsegments": row[4]}
        for row in db.execute("SELECT id, pool_id, path, size_bytes, nsegments FROM container")
    }
    vdisks = {
        row[0]: {"name": row[1], "pool": row[2], "size": row[3], "thin": bool(row[4]), "state": row[5]}
        for row in db.execute("SELECT id, name, pool_id, size_bytes, thin, state FROM vdisk")
    }
    for cid, c in containers.items():
        if c["pool"] not in pools:
            problems.append(f"container {cid} ({c['path']}) belongs to missing pool {c['pool']}")
            continue
        segment_size = pools[c["pool"]][1]
        if c["nsegments"] * segment_size > c["size"]:
            problems.append(f"container {cid} claims {c['nsegments']} segments, more than its {c['size']} bytes hold")
        try:
            with open(c["path"], "rb") as f:
                actual = f.seek(0, os.SEEK_END)
        except FileNotFoundError:
            problems.append(f"container {cid}: {c['path']} is missing")
        except OSError as exc:
            problems.append(f"container {cid}: {c['path']} cannot be read: {exc.strerror}")
        else:
            if actual < c["nsegments"] * segment_size:
                problems.append(f"container {cid}: {c['path']} has {actual} bytes, segments need {c['nsegments'] * segment_size}")

    references: Counter[tuple[int, int]] = Counter()
    owners: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    mapped: Counter[int] = Counter()
    for vdisk_id, vseg, cid, pseg in db.execute("SELECT vdisk_id, vseg, container_id, pseg FROM mapping"):
        vdisk = vdisks.get(vdisk_id)
        if vdisk is None:
            problems.append(f"mapping of missing vdisk {vdisk_id} (segment {vseg})")
            continue
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
        references[(cid, pseg)] += 1
        owners[(cid, pseg)].add(vdisk_id)

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
            problems.append(f"container {key[0]} segment {key[1]} is shared by unrelated vdisks {', '.join(names)}")

    summary: list[str] = []
    for pool_id, (name, _) in sorted(pools.items()):
        capacity = sum(c["nsegments"] for c in containers.values() if c["pool"] == pool_id)
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
    summary.append(f"{len(vdisks)} vdisks, {sum(mapped.values())} mapped segments")
    return problems, summary
