"""`san config export` and `san config import`: the configuration (pools, vdisks, hosts, zones; definitions, not
data) as one JSON document, and that document applied back through the API.

Import plans first: what exists and matches is left alone, a vdisk smaller than in the file grows, what is missing
is made; anything else is a conflict, one line each, and then nothing changes. If a step fails part way, what this
import made is deleted again. Export writes atomically (mode 0600) and keeps dated backups of the file it replaces,
the 10 newest, as targetcli's saveconfig does."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from san.client import ApiError, SanClient

FORMAT = 1
BACKUPS = 10


class ConfigConflict(ApiError):
    """The document cannot be applied as it is; lines says why, one line per conflict."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(f"{len(lines)} conflict(s); nothing was changed:")
        self.lines = lines


def export(client: SanClient, with_secrets: bool = False) -> dict[str, Any]:
    """The current configuration; CHAP secrets only with with_secrets."""
    pools = []
    for pool in client.pools():
        entry: dict[str, Any] = {
            "name": pool.name,
            "segment_size": pool.segment_size,
            "warn_percent": pool.warn_percent,
            "allocate_ahead": pool.allocate_ahead,
        }
        container = pool.containers[0] if pool.containers else None
        if container is None or container.owned:
            entry["size"] = pool.capacity_bytes  # san's own file: made anew, this size (its label segment aside)
        else:
            entry["path"] = container.path
            entry["existing"] = container.kind == "file"
        pools.append(entry)
    vdisks = [
        {"name": v.name, "pool": v.pool, "size": v.size_bytes, "block_size": v.block_size, "thin": v.thin}
        for v in client.vdisks()
    ]
    hosts = []
    for host in client.hosts(secrets=with_secrets):
        entry = {"name": host.name, "iqn": host.iqn, "chap_user": host.chap_user, "mutual_user": host.mutual_user}
        if with_secrets:
            entry.update(chap_secret=host.chap_secret or "", mutual_secret=host.mutual_secret or "")
        hosts.append(entry)
    zones = [{"host": z.host, "vdisk": z.vdisk, "lun": z.lun, "read_only": z.read_only} for z in client.zones()]
    return {"san_config": FORMAT, "pools": pools, "vdisks": vdisks, "hosts": hosts, "zones": zones}


def save(document: dict[str, Any], path: str) -> str | None:
    """Write document to path atomically, mode 0600; a file already there is kept as a dated backup (its path is
    returned) in path's directory under backup/ (a private directory of this user, never a link), the newest
    BACKUPS of that file's backups."""
    directory = os.path.dirname(os.path.abspath(path))
    backup = None
    if os.path.exists(path):
        backups = os.path.join(directory, "backup")
        with contextlib.suppress(FileExistsError):
            os.mkdir(backups, 0o700)
        st = os.lstat(backups)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise OSError(f"{backups} must be a directory of uid {os.geteuid()} with mode 0700 (backups may hold secrets)")
        stem = os.path.splitext(os.path.basename(path))[0]
        pattern = re.compile(re.escape(stem) + r"-\d{8}-\d{6}(\.\d+)?\.json")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = os.path.join(backups, f"{stem}-{stamp}.json")
        same_second = 1
        while os.path.lexists(backup):  # two saves in one second: both kept
            backup = os.path.join(backups, f"{stem}-{stamp}.{same_second}.json")
            same_second += 1
        with open(path, "rb") as old:
            _write(backup, old.read())
        kept = sorted(
            (n for n in os.listdir(backups) if pattern.fullmatch(n)), key=lambda n: os.lstat(os.path.join(backups, n)).st_mtime_ns
        )
        for name in kept[:-BACKUPS]:
            os.unlink(os.path.join(backups, name))
    _write(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    return backup


def _write(path: str, data: bytes) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(path: str) -> dict[str, Any]:
    """A document from a file, its shape checked (every error one line)."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.loads(f.read(16 << 20))
    except OSError as exc:
        raise ApiError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ApiError(f"{path} is not a san configuration: {exc}") from None
    if not isinstance(document, dict) or document.get("san_config") != FORMAT:
        raise ApiError(f"{path} is not a san configuration (format {FORMAT})")
    for key, fields in SHAPE.items():
        items = document.get(key, [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ApiError(f"{path}: {key} must be a list of objects")
        for item in items:
            missing = [f for f in fields if f not in item]
            unknown = sorted(set(item) - set(fields) - OPTIONAL[key])
            if missing or unknown:
                what = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
                raise ApiError(f"{path}: an entry of {key} ({item.get('name', item.get('host', '?'))}): {what}")
    return document


SHAPE = {
    "pools": ("name", "segment_size", "warn_percent", "allocate_ahead"),
    "vdisks": ("name", "pool", "size", "block_size", "thin"),
    "hosts": ("name", "iqn", "chap_user", "mutual_user"),
    "zones": ("host", "vdisk", "lun", "read_only"),
}
OPTIONAL = {"pools": {"size", "path", "existing"}, "vdisks": set(), "hosts": {"chap_secret", "mutual_secret"}, "zones": set()}


@dataclass
class Plan:
    """What an import does: each step a (description, method, path, body) in order; conflicts stop it."""

    steps: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    grows: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    unchanged: int = 0


def _duplicates(document: dict[str, Any]) -> list[str]:
    found = []
    for kind, key in (("pools", "name"), ("vdisks", "name"), ("hosts", "name"), ("hosts", "iqn")):
        seen: set[str] = set()
        for item in document.get(kind, []):
            if item[key] in seen:
                found.append(f"the file has {kind} {key} {item[key]} twice")
            seen.add(item[key])
    zoned: set[tuple[str, str]] = set()
    for zone in document.get("zones", []):
        if (zone["host"], zone["vdisk"]) in zoned:
            found.append(f"the file has zone {zone['host']}/{zone['vdisk']} twice")
        zoned.add((zone["host"], zone["vdisk"]))
    return found


def plan(client: SanClient, document: dict[str, Any]) -> Plan:
    """Compare the document with what the API has now (and with itself: names twice, references to nothing)."""
    out = Plan()
    out.conflicts += _duplicates(document)
    pools = {p.name: p for p in client.pools()}
    for pool in document.get("pools", []):
        have = pools.get(pool["name"])
        if have is None:
            body = {k: pool[k] for k in ("name", "segment_size", "warn_percent", "allocate_ahead")}
            body.update({k: pool[k] for k in ("size", "path", "existing") if k in pool})
            out.steps.append((f"create pool {pool['name']}", "POST", "/pools", body))
            continue
        differs = [k for k in ("segment_size", "warn_percent", "allocate_ahead") if getattr(have, k) != pool[k]]
        container = have.containers[0] if have.containers else None
        if "path" in pool and (container is None or container.path != pool["path"]):
            differs.append("path")
        if "size" in pool and (container is None or container.owned) and have.capacity_bytes != pool["size"]:
            differs.append("size")
        if differs:
            out.conflicts.append(f"pool {pool['name']} exists with another {', '.join(differs)}")
        else:
            out.unchanged += 1
    pool_names = set(pools) | {p["name"] for p in document.get("pools", [])}
    vdisks = {v.name: v for v in client.vdisks()}
    for vdisk in document.get("vdisks", []):
        found = vdisks.get(vdisk["name"])
        if found is None and vdisk["pool"] not in pool_names:
            out.conflicts.append(f"vdisk {vdisk['name']} is in pool {vdisk['pool']}, which neither exists nor is in the file")
            continue
        if found is None:
            body = {"name": vdisk["name"], "pool": vdisk["pool"], "size": vdisk["size"], "block_size": vdisk["block_size"]}
            out.steps.append((f"create vdisk {vdisk['name']}", "POST", "/vdisks", {**body, "thick": not vdisk["thin"]}))
            continue
        differs = [k for k in ("pool", "block_size", "thin") if getattr(found, k) != vdisk[k]]
        if found.size_bytes > vdisk["size"]:
            differs.append("size (larger than the file's: a vdisk never shrinks)")
        if differs:
            out.conflicts.append(f"vdisk {vdisk['name']} exists with another {', '.join(differs)}")
        elif found.size_bytes < vdisk["size"]:
            path = f"/vdisks/{quote(vdisk['name'], safe='')}/grow"
            out.grows.append((f"grow vdisk {vdisk['name']} to {vdisk['size']} bytes", "POST", path, {"size": vdisk["size"]}))
        else:
            out.unchanged += 1
    with_secrets = any("chap_secret" in h or "mutual_secret" in h for h in document.get("hosts", []))
    hosts = {h.name: h for h in client.hosts(secrets=with_secrets)}
    iqns = {h.iqn: h.name for h in hosts.values()}
    for host in document.get("hosts", []):
        known = hosts.get(host["name"])
        if known is None and iqns.get(host["iqn"], host["name"]) != host["name"]:
            out.conflicts.append(f"host {host['name']}: iSCSI name {host['iqn']} is host {iqns[host['iqn']]}'s already")
            continue
        if known is None:
            secrets = {"chap_secret": host.get("chap_secret", ""), "mutual_secret": host.get("mutual_secret", "")}
            for user, secret in (("chap_user", "chap_secret"), ("mutual_user", "mutual_secret")):
                if host[user] and not secrets[secret]:
                    out.conflicts.append(
                        f"host {host['name']} has a {user} but the file holds no secret for it (export with --with-secrets)"
                    )
            body = {k: host[k] for k in ("name", "iqn", "chap_user", "mutual_user")}
            out.steps.append((f"create host {host['name']}", "POST", "/hosts", {**body, **secrets}))
            continue
        keys = ["iqn", "chap_user", "mutual_user"] + [k for k in ("chap_secret", "mutual_secret") if k in host]
        differs = [k for k in keys if (getattr(known, k) or "") != host[k]]
        if differs:
            out.conflicts.append(f"host {host['name']} exists with another {', '.join(differs)}")
        else:
            out.unchanged += 1
    zones = {(z.host, z.vdisk): z for z in client.zones()}
    luns = {(z.host, z.lun): z.vdisk for z in zones.values()}
    host_names = set(hosts) | {h["name"] for h in document.get("hosts", [])}
    vdisk_names = set(vdisks) | {v["name"] for v in document.get("vdisks", [])}
    for zone in document.get("zones", []):
        have_zone = zones.get((zone["host"], zone["vdisk"]))
        where = f"zone {zone['host']}/{zone['vdisk']}"
        if have_zone is None:
            missing = [f"{kind} {name}" for kind, name, names in (("host", zone["host"], host_names),
                       ("vdisk", zone["vdisk"], vdisk_names)) if name not in names]  # fmt: skip
            taken = luns.get((zone["host"], zone["lun"]))
            if missing:
                verbs = "neither exists nor is" if len(missing) == 1 else "neither exist nor are"
                out.conflicts.append(f"{where}: {' and '.join(missing)} {verbs} in the file")
            elif taken is not None:
                out.conflicts.append(f"{where}: host {zone['host']} already sees {taken} at LUN {zone['lun']}")
            else:
                luns[(zone["host"], zone["lun"])] = zone["vdisk"]
                out.steps.append((f"add {where} at LUN {zone['lun']}", "POST", "/zones", dict(zone)))
        elif (have_zone.lun, have_zone.read_only) != (zone["lun"], zone["read_only"]):
            access = "read-only" if have_zone.read_only else "read-write"
            out.conflicts.append(f"{where} exists at LUN {have_zone.lun} ({access})")
        else:
            out.unchanged += 1
    return out


def apply(client: SanClient, todo: Plan) -> list[str]:
    """Carry the plan out (a thick vdisk: until its allocation has finished); on a failure, delete what it made,
    in reverse, and raise saying what could not be undone. Returns what was done."""
    if todo.conflicts:
        raise ConfigConflict(todo.conflicts)
    made: list[str] = []
    done: list[str] = []
    what = ""
    try:
        for what, method, path, body in todo.steps + todo.grows:  # grows last: a grow cannot be undone
            answer = client.request(method, path, body)
            if path == "/vdisks" and isinstance(answer, dict) and answer.get("state") == "allocating":
                made.append(_undo_path(path, body))
                _allocated(client, body["name"])
            elif method == "POST" and not path.endswith("/grow"):
                made.append(_undo_path(path, body))
            done.append(what)
    except ApiError as exc:
        left = []
        for undo in reversed(made):
            try:
                client.delete(undo)
            except ApiError as failed:
                left.append(f"{undo} ({failed})")
        outcome = "what this import made was deleted again" if not left else f"could not delete again: {', '.join(left)}"
        raise ApiError(f"{what}: {exc}; {outcome}") from None
    return done


def _allocated(client: SanClient, name: str, stalled: float = 300.0) -> None:
    """Wait for a thick vdisk's allocation to end; ApiError if it ends other than ready or stops progressing."""
    seen, since = -1.0, time.monotonic()
    while (vdisk := client.vdisk(name)).state == "allocating":
        if vdisk.progress != seen:
            seen, since = vdisk.progress, time.monotonic()
        elif time.monotonic() - since > stalled:
            raise ApiError(f"thick vdisk {name} made no allocation progress for {stalled:.0f} s")
        time.sleep(0.2)
    if vdisk.state != "ready":
        raise ApiError(f"thick vdisk {name} ended {vdisk.state}")


def _undo_path(path: str, body: dict[str, Any]) -> str:
    if path == "/zones":
        return f"/zones/{quote(body['host'], safe='')}/{quote(body['vdisk'], safe='')}"
    return f"{path}/{quote(body['name'], safe='')}"
