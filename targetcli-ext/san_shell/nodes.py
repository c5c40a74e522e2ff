"""san's objects as a configshell tree, the way targetcli shows LIO's: /pools, /vdisks, /hosts/<host>/luns,
/gateways and /jobs, each node with a one-line summary and health for `ls`, its commands and their completions.

Every node reads from one Snapshot of the API taken before each command (SanTree.refresh), so after any command the
tree is what the API says; every change goes through the typed client, and its refusal is the server's line."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from configshell_fb import ConfigNode, ExecutionError

from san.cli import config
from san.client import ApiError, Gateway, Host, Pool, SanClient, VDisk, Zone
from san.units import format_size, parse_size

SIZES = ["1G", "10G", "40G", "100G", "500G", "1T"]
SEGMENT_SIZES = ["64K", "256K", "1M", "4M", "16M", "64M", "256M", "1G"]
BOOLEANS = ["true", "false"]
BLOCK_SIZES = ["512", "4096"]


@dataclass
class Snapshot:
    """What the API holds, read once per command."""

    pools: list[Pool]
    vdisks: list[VDisk]
    hosts: list[Host]
    zones: list[Zone]
    gateways: list[Gateway]

    @classmethod
    def of(cls, client: SanClient) -> Snapshot:
        return cls(client.pools(), client.vdisks(), client.hosts(), client.zones(), client.gateways())


def _size(value: str, what: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ExecutionError(f"{what}: {exc}") from None


def _bool(value: str | bool, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "yes", "1"):
        return True
    if value.lower() in ("false", "no", "0"):
        return False
    raise ExecutionError(f"{what} must be true or false, not {value!r}")


def _int(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ExecutionError(f"{what} must be a number, not {value!r}") from None


def _matching(candidates: Iterable[str], text: str) -> list[str]:
    found = sorted({c for c in candidates if c.startswith(text)})
    return [f"{found[0]} "] if len(found) == 1 else found  # one match: complete it and move on


def _keyword_completions(text: str, current: str, keywords: dict[str, Callable[[], Iterable[str]]]) -> list[str]:
    """Values for the keyword being typed (current), or the keywords themselves."""
    if current in keywords:
        return _matching(keywords[current](), text)
    return _matching((f"{k}=" for k in keywords), text)


class SanNode(ConfigNode):  # type: ignore[misc]
    """A node of san's tree; update() takes the latest Snapshot, for itself and its children."""

    help_intro = """
                 san: thin-provisioned vdisks on shared pools, served over iSCSI. Changes take effect at once
                 (there is nothing to save for them to last); saveconfig and restoreconfig keep and restore the
                 configuration as a file.
                 """

    def __init__(self, name: str, parent: ConfigNode, client: SanClient) -> None:
        super().__init__(name, parent)
        self.client = client

    def update(self, snapshot: Snapshot) -> None:
        for child in self.children:
            if isinstance(child, SanNode):
                child.update(snapshot)

    def sync(self, wanted: dict[str, Callable[[], SanNode]], snapshot: Snapshot) -> None:
        """Children named as in wanted (made by its factories); the ones no longer there go."""
        current = {child.name: child for child in self.children}
        for name, child in current.items():
            if name not in wanted:
                self.remove_child(child)
        for name, make in wanted.items():
            if name not in current:
                make()
        SanNode.update(self, snapshot)

    def call(self, action: Callable[[], Any]) -> Any:
        """Run an API call; its refusal is shown as the server's line; then the tree follows the API."""
        try:
            return action()
        except ApiError as exc:
            raise ExecutionError(str(exc)) from None
        finally:
            tree = self.tree()
            if tree is not None:
                tree.refresh()

    def tree(self) -> SanTree | None:
        node: ConfigNode | None = self
        while node is not None and not isinstance(node, SanTree):
            node = node.parent
        return node

    def snapshot(self) -> Snapshot:
        tree = self.tree()
        assert tree is not None and tree.latest is not None
        return tree.latest

    def say(self, text: str) -> None:
        self.shell.con.display(text)


class AttributeNode(SanNode):
    """A node whose object's fields are `get attribute NAME` (and, where san can change them, `set attribute`)."""

    WRITABLE: frozenset[str] = frozenset()

    def __init__(self, name: str, parent: ConfigNode, client: SanClient, attributes: dict[str, str]) -> None:
        super().__init__(name, parent, client)
        for attribute, description in attributes.items():
            self.define_config_group_param("attribute", attribute, "string", description, attribute in self.WRITABLE)

    def attributes(self) -> dict[str, Any]:
        return {}

    def ui_getgroup_attribute(self, attribute: str) -> str:
        return str(self.attributes().get(attribute, ""))

    def ui_setgroup_attribute(self, attribute: str, value: str) -> None:
        raise ExecutionError(f"{attribute} cannot be changed")


# -- the top of the tree ---------------------------------------------------------------------------------------


class SanTree(SanNode):
    """The top of san's tree: `/` in san-shell, `/san` in targetcli. Holds the client and the latest Snapshot."""

    def __init__(self, name: str, parent: ConfigNode | None, client: SanClient, shell: Any = None) -> None:
        if parent is None:
            ConfigNode.__init__(self, name, None, shell)
        else:
            ConfigNode.__init__(self, name, parent)
        self.client = client
        self.latest: Snapshot | None = None
        PoolsNode(self, client)
        VDisksNode(self, client)
        HostsNode(self, client)
        GatewaysNode(self, client)
        JobsNode(self, client)

    def refresh(self) -> None:
        """Read the API and bring the whole tree in line with it."""
        try:
            self.latest = Snapshot.of(self.client)
        except ApiError as exc:
            raise ExecutionError(str(exc)) from None
        self.update(self.latest)

    def summary(self) -> tuple[str, bool | None]:
        if self.latest is None:
            return "", None
        offline = [p.name for p in self.latest.pools if p.state != "online"]
        text = f"{len(self.latest.pools)} pools, {len(self.latest.vdisks)} vdisks, {len(self.latest.gateways)} gateways"
        return (text + (f", offline: {', '.join(offline)}" if offline else "")), not offline

    def ui_command_refresh(self) -> None:
        """Read everything again from the API (the tree also does so before every command)."""
        self.refresh()

    def ui_command_saveconfig(self, savefile: str | None = None, with_secrets: str = "false") -> None:
        """
        Save the configuration (pools, vdisks, hosts, zones: definitions, not data) to savefile, atomically and mode
        0600, keeping the file it replaces under backup/ beside it. with_secrets=true includes CHAP secrets.
        The same as `san config export --out savefile`; savefile defaults to /etc/san/saveconfig.json as root,
        else ~/.san/saveconfig.json.
        """
        path = os.path.expanduser(savefile or default_savefile())
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        document = self.call(lambda: config.export(self.client, _bool(with_secrets, "with_secrets")))
        try:
            backup = config.save(document, path)
        except OSError as exc:
            raise ExecutionError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.say(f"Configuration saved to {path}" + (f" (the previous one is {backup})" if backup else ""))

    def ui_complete_saveconfig(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {"savefile": lambda: [], "with_secrets": lambda: BOOLEANS})

    def ui_command_restoreconfig(self, savefile: str | None = None, dry_run: str = "false") -> None:
        """
        Make what savefile describes (`san config import`): what exists and matches is kept, missing objects are
        made; any conflict is listed and then nothing changes. dry_run=true only says what it would do.
        """
        path = os.path.expanduser(savefile or default_savefile())
        try:
            document = config.load(path)
            todo = config.plan(self.client, document)
            if todo.conflicts:
                raise ExecutionError("\n".join([f"{len(todo.conflicts)} conflict(s); nothing was changed:", *todo.conflicts]))
            if _bool(dry_run, "dry_run"):
                for what, *_ in todo.steps + todo.grows:
                    self.say(f"would {what}")
                return
            done = self.call(lambda: config.apply(self.client, todo))
        except ApiError as exc:
            raise ExecutionError(str(exc)) from None
        self.say(f"Configuration restored from {path}: {len(done)} change(s), {todo.unchanged} unchanged")

    def ui_complete_restoreconfig(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {"savefile": lambda: [], "dry_run": lambda: BOOLEANS})


def default_savefile() -> str:
    return "/etc/san/saveconfig.json" if os.geteuid() == 0 else "~/.san/saveconfig.json"


# -- pools -----------------------------------------------------------------------------------------------------


class PoolsNode(SanNode):
    """The pools vdisks draw their segments from."""

    def __init__(self, parent: ConfigNode, client: SanClient) -> None:
        super().__init__("pools", parent, client)

    def update(self, snapshot: Snapshot) -> None:
        self.pools = snapshot.pools
        self.sync({p.name: partial(PoolNode, self, self.client, p) for p in snapshot.pools}, snapshot)

    def summary(self) -> tuple[str, bool | None]:
        online = sum(1 for p in self.pools if p.state == "online")
        return f"Pools: {len(self.pools)}", online == len(self.pools)

    def ui_command_create(
        self,
        name: str,
        size: str | None = None,
        path: str | None = None,
        segment_size: str | None = None,
        existing: str = "false",
        warn_percent: str | None = None,
        allocate_ahead: str | None = None,
    ) -> None:
        """
        Create a pool: on a new sparse file of size (default DATA/pools/NAME.img, or path), on an unused block
        device (path), or on an existing file (path, existing=true: its contents are overwritten).
        """
        pool = self.call(lambda: self.client.create_pool(
            name, _size(size, "size") if size else None, os.path.abspath(path) if path else None, _bool(existing, "existing"),
            _size(segment_size, "segment_size") if segment_size else None, _int(warn_percent, "warn_percent"),
            _int(allocate_ahead, "allocate_ahead")))  # fmt: skip
        self.say(f"Created pool {pool.name}: {format_size(pool.capacity_bytes)} in {format_size(pool.segment_size)} segments.")

    def ui_complete_create(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {
            "name": lambda: [], "size": lambda: SIZES, "path": lambda: _paths(text), "segment_size": lambda: SEGMENT_SIZES,
            "existing": lambda: BOOLEANS, "warn_percent": lambda: ["70", "80", "90"], "allocate_ahead": lambda: ["0", "4", "16"],
        })  # fmt: skip

    def ui_command_delete(self, name: str) -> None:
        """Delete a pool that no vdisk uses (a file san made is removed; a device or taken-over file is wiped)."""
        self.call(lambda: self.client.delete_pool(name))
        self.say(f"Deleted pool {name}.")

    def ui_complete_delete(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {"name": lambda: [p.name for p in self.pools]})


def _paths(text: str) -> list[str]:
    directory = os.path.dirname(text) or "."
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(os.path.dirname(text), n) + ("/" if os.path.isdir(os.path.join(directory, n)) else "") for n in names]


class PoolNode(AttributeNode):
    """One pool: its usage, its containers."""

    def __init__(self, parent: ConfigNode, client: SanClient, pool: Pool) -> None:
        super().__init__(pool.name, parent, client, {
            "segment_size": "bytes per segment", "capacity": "bytes vdisks can use", "used": "bytes mapped by vdisks",
            "free": "bytes free", "provisioned": "sum of the sizes of its vdisks", "warn_percent": "fullness that warns hosts",
            "allocate_ahead": "extra segments allocated for sequential writers", "state": "online or offline",
        })  # fmt: skip
        self.pool = pool

    def update(self, snapshot: Snapshot) -> None:
        self.pool = next(p for p in snapshot.pools if p.name == self.name)
        self.sync({f"container{c.id}": partial(ContainerNode, self, self.client, c) for c in self.pool.containers}, snapshot)

    def attributes(self) -> dict[str, Any]:
        p = self.pool
        return {"segment_size": p.segment_size, "capacity": p.capacity_bytes, "used": p.used_bytes, "free": p.free_bytes,
                "provisioned": p.provisioned_bytes, "warn_percent": p.warn_percent, "allocate_ahead": p.allocate_ahead,
                "state": p.state}  # fmt: skip

    def summary(self) -> tuple[str, bool | None]:
        p = self.pool
        text = (f"{format_size(p.capacity_bytes)}, data {p.used_percent:.1f}%, provisioned {format_size(p.provisioned_bytes)},"
                f" {p.vdisks} vdisk{'s' if p.vdisks != 1 else ''}")  # fmt: skip
        if p.state != "online":
            return f"{text}, OFFLINE: {p.problem}", False
        return text, p.used_percent < p.warn_percent

    def ui_command_info(self) -> None:
        """Show the pool's figures and containers."""
        from san.cli.views import show_pool

        self.say(show_pool(self.pool))


class ContainerNode(SanNode):
    """A file or block device holding a pool's segments."""

    def __init__(self, parent: ConfigNode, client: SanClient, container: Any) -> None:
        super().__init__(f"container{container.id}", parent, client)
        self.container = container

    def summary(self) -> tuple[str, bool | None]:
        c = self.container
        return f"{c.path} ({c.kind}, {format_size(c.size_bytes)})", None


# -- vdisks ----------------------------------------------------------------------------------------------------


class VDisksNode(SanNode):
    """The virtual disks hosts see as LUNs."""

    def __init__(self, parent: ConfigNode, client: SanClient) -> None:
        super().__init__("vdisks", parent, client)

    def update(self, snapshot: Snapshot) -> None:
        self.vdisks = snapshot.vdisks
        self.sync({v.name: partial(VDiskNode, self, self.client, v) for v in snapshot.vdisks}, snapshot)

    def summary(self) -> tuple[str, bool | None]:
        return f"VDisks: {len(self.vdisks)}", all(v.state == "ready" for v in self.vdisks)

    def ui_command_create(self, name: str, pool: str, size: str, thick: str = "false", block_size: str = "512") -> None:
        """Create a vdisk of size in pool: thin (segments as they are written) or thick=true (all of them now)."""
        vdisk = self.call(lambda: self.client.create_vdisk(name, pool, _size(size, "size"), _bool(thick, "thick"),
                                                           _int(block_size, "block_size") or 512))  # fmt: skip
        kind = "thin" if vdisk.thin else "thick (allocating: see /jobs)" if vdisk.state == "allocating" else "thick"
        self.say(f"Created vdisk {vdisk.name}: {format_size(vdisk.size_bytes)} {kind} in pool {vdisk.pool}.")

    def ui_complete_create(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {
            "name": lambda: [], "pool": lambda: [p.name for p in self.snapshot().pools], "size": lambda: SIZES,
            "thick": lambda: BOOLEANS, "block_size": lambda: BLOCK_SIZES,
        })  # fmt: skip

    def ui_command_delete(self, name: str) -> None:
        """Delete a vdisk no host sees (its segments go back to the pool)."""
        self.call(lambda: self.client.delete_vdisk(name))
        self.say(f"Deleted vdisk {name}.")

    def ui_complete_delete(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {"name": lambda: [v.name for v in self.vdisks]})


class VDiskNode(AttributeNode):
    """One vdisk: size, provisioning, data%, state; `set attribute size=...` grows it."""

    WRITABLE = frozenset({"size"})

    def __init__(self, parent: ConfigNode, client: SanClient, vdisk: VDisk) -> None:
        super().__init__(vdisk.name, parent, client, {
            "size": "bytes hosts see (set it larger to grow the vdisk)", "pool": "the pool its segments come from",
            "block_size": "logical block size", "thin": "true: segments as written", "allocated": "bytes of pool storage",
            "serial": "unit serial number", "state": "ready, allocating or offline",
        })  # fmt: skip
        self.vdisk = vdisk

    def update(self, snapshot: Snapshot) -> None:
        self.vdisk = next(v for v in snapshot.vdisks if v.name == self.name)

    def attributes(self) -> dict[str, Any]:
        v = self.vdisk
        return {"size": v.size_bytes, "pool": v.pool, "block_size": v.block_size, "thin": str(v.thin).lower(),
                "allocated": v.allocated_bytes, "serial": v.serial, "state": v.state}  # fmt: skip

    def ui_setgroup_attribute(self, attribute: str, value: str) -> None:
        if attribute != "size":
            raise ExecutionError(f"{attribute} cannot be changed")
        self.ui_command_grow(value)

    def summary(self) -> tuple[str, bool | None]:
        v = self.vdisk
        text = f"{format_size(v.size_bytes)} {'thin' if v.thin else 'thick'} in {v.pool}, data {v.data_percent:.1f}%"
        if v.state != "ready":
            return f"{text}, {v.state}" + (f" {v.progress * 100:.0f}%" if v.state == "allocating" else ""), v.state != "offline"
        return text, True

    def ui_command_rename(self, name: str) -> ConfigNode | None:
        """Give the vdisk another name (hosts see the same LUN, serial and data)."""
        vdisk = self.call(lambda: self.client.rename_vdisk(self.name, name))
        self.say(f"Renamed vdisk {self.name} to {vdisk.name}.")
        tree = self.tree()
        if tree is not None:
            return tree.get_node(f"vdisks/{vdisk.name}")  # the node under its new name
        return None

    def ui_command_grow(self, size: str) -> None:
        """Grow the vdisk to size (hosts are told their capacity changed)."""
        vdisk = self.call(lambda: self.client.grow_vdisk(self.name, _size(size, "size")))
        self.say(f"Grew vdisk {vdisk.name} to {format_size(vdisk.size_bytes)}.")

    def ui_complete_grow(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {"size": lambda: SIZES})

    def ui_command_info(self) -> None:
        """Show the vdisk's figures."""
        from san.cli.views import show_vdisk

        self.say(show_vdisk(self.vdisk))


# -- hosts and their LUNs --------------------------------------------------------------------------------------


class HostsNode(SanNode):
    """The initiators san knows, with their CHAP credentials and LUNs."""

    def __init__(self, parent: ConfigNode, client: SanClient) -> None:
        super().__init__("hosts", parent, client)

    def update(self, snapshot: Snapshot) -> None:
        self.hosts = snapshot.hosts
        self.sync({h.name: partial(HostNode, self, self.client, h) for h in snapshot.hosts}, snapshot)

    def summary(self) -> tuple[str, bool | None]:
        return f"Hosts: {len(self.hosts)}", None

    def ui_command_create(
        self,
        name: str,
        iqn: str,
        chap_user: str = "",
        chap_secret_file: str | None = None,
        mutual_user: str = "",
        mutual_secret_file: str | None = None,
    ) -> None:
        """
        Create a host for the initiator named iqn. With chap_user it must prove itself with CHAP: the secret is read
        from chap_secret_file, or asked for (never given on the command line, where every user can see it); with
        mutual_user san proves itself too.
        """
        chap_secret = _secret(chap_secret_file, "chap secret") if chap_user else ""
        mutual_secret = _secret(mutual_secret_file, "mutual secret") if mutual_user else ""
        host = self.call(lambda: self.client.create_host(name, iqn, chap_user, chap_secret, mutual_user, mutual_secret))
        self.say(f"Created host {host.name} for {host.iqn}.")
        for warning in host.warnings or []:
            self.shell.log.warning(warning)

    def ui_complete_create(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {
            "name": lambda: [], "iqn": lambda: ["iqn."], "chap_user": lambda: [], "chap_secret_file": lambda: _paths(text),
            "mutual_user": lambda: [], "mutual_secret_file": lambda: _paths(text),
        })  # fmt: skip

    def ui_command_delete(self, name: str) -> None:
        """Delete a host that sees no LUN."""
        self.call(lambda: self.client.delete_host(name))
        self.say(f"Deleted host {name}.")

    def ui_complete_delete(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {"name": lambda: [h.name for h in self.hosts]})


def _secret(path: str | None, what: str) -> str:
    if path is not None:
        try:
            with open(os.path.expanduser(path)) as f:
                secret = f.read().rstrip("\r\n")
        except OSError as exc:
            raise ExecutionError(f"cannot read the {what} from {path}: {exc.strerror}") from None
        if not secret:
            raise ExecutionError(f"the {what} file {path} is empty")
        return secret
    if not sys.stdin.isatty():
        raise ExecutionError(f"give the {what} in a file ({what.replace(' ', '_')}_file=FILE): no terminal to ask on")
    first, again = getpass.getpass(f"{what}: "), getpass.getpass(f"{what} again: ")
    if first != again:
        raise ExecutionError(f"the two {what}s differ")
    return first


class HostNode(AttributeNode):
    """One host: its iSCSI name, CHAP, sessions and LUNs."""

    def __init__(self, parent: ConfigNode, client: SanClient, host: Host) -> None:
        super().__init__(host.name, parent, client, {
            "iqn": "the initiator's iSCSI name", "chap_user": "CHAP user it logs in as",
            "mutual_user": "CHAP user san answers as",
            "sessions": "its iSCSI sessions now",
        })  # fmt: skip
        self.host = host
        LunsNode(self, client)

    def update(self, snapshot: Snapshot) -> None:
        self.host = next(h for h in snapshot.hosts if h.name == self.name)
        super().update(snapshot)

    def attributes(self) -> dict[str, Any]:
        h = self.host
        return {"iqn": h.iqn, "chap_user": h.chap_user, "mutual_user": h.mutual_user, "sessions": h.sessions}

    def summary(self) -> tuple[str, bool | None]:
        h = self.host
        chap = ("mutual CHAP" if h.mutual_user else "CHAP") if h.chap_user else "no CHAP"
        sessions = "" if h.sessions is None else f", {h.sessions} session{'s' if h.sessions != 1 else ''}"
        return f"{h.iqn}, {chap}{sessions}", bool(h.chap_user) or None

    def ui_command_modify(
        self,
        iqn: str | None = None,
        chap_user: str | None = None,
        chap_secret_file: str | None = None,
        mutual_user: str | None = None,
        mutual_secret_file: str | None = None,
        no_chap: str = "false",
    ) -> None:
        """
        Change the host's iSCSI name or CHAP credentials; its LUNs stay. A new chap_user or mutual_user without a
        secret file asks for the secret; no_chap=true removes CHAP.
        """
        changes: dict[str, str] = {} if iqn is None else {"iqn": iqn}
        if _bool(no_chap, "no_chap"):
            changes["chap_user"] = ""
        for user_key, secret_key, user, path, what in (
            ("chap_user", "chap_secret", chap_user, chap_secret_file, "chap secret"),
            ("mutual_user", "mutual_secret", mutual_user, mutual_secret_file, "mutual secret"),
        ):
            if user is not None:
                changes[user_key] = user
            if path is not None or user:
                changes[secret_key] = _secret(path, what)
        if not changes:
            raise ExecutionError(
                "nothing to change: give iqn, chap_user, chap_secret_file, mutual_user, mutual_secret_file or no_chap"
            )
        host = self.call(lambda: self.client.modify_host(self.name, **changes))
        self.say(f"Modified host {host.name}: {host.iqn}.")

    def ui_complete_modify(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {
            "iqn": lambda: [self.host.iqn], "chap_user": lambda: [], "chap_secret_file": lambda: _paths(text),
            "mutual_user": lambda: [], "mutual_secret_file": lambda: _paths(text), "no_chap": lambda: BOOLEANS,
        })  # fmt: skip

    def ui_command_info(self) -> None:
        """Show the host and its LUNs."""
        from san.cli.views import show_host

        self.say(show_host(self.host))


class LunsNode(SanNode):
    """The LUNs a host sees: each a zone of a vdisk."""

    def __init__(self, parent: HostNode, client: SanClient) -> None:
        super().__init__("luns", parent, client)
        self.owner = parent

    def update(self, snapshot: Snapshot) -> None:
        self.zones = [z for z in snapshot.zones if z.host == self.owner.name]
        self.sync({str(z.lun): partial(LunNode, self, self.client, z) for z in self.zones}, snapshot)

    def summary(self) -> tuple[str, bool | None]:
        return f"LUNs: {len(self.zones)}", None

    def ui_command_create(self, vdisk: str, lun: str | None = None, read_only: str = "false") -> None:
        """Let the host see vdisk at lun (default the lowest free one), read_only=true to allow reads only."""
        zone = self.call(lambda: self.client.add_zone(self.owner.name, vdisk, _int(lun, "lun"), _bool(read_only, "read_only")))
        self.say(f"Host {zone.host} sees {zone.vdisk} as LUN {zone.lun} ({'read-only' if zone.read_only else 'read-write'}).")

    def ui_complete_create(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        used = {z.lun for z in self.zones}
        return _keyword_completions(text, current_param, {
            "vdisk": lambda: [v.name for v in self.snapshot().vdisks],
            "lun": lambda: [str(min(set(range(len(used) + 1)) - used))],
            "read_only": lambda: BOOLEANS,
        })  # fmt: skip

    def ui_command_move(self, lun: str, to: str) -> None:
        """Give the vdisk at lun the LUN number to (the host is told its LUNs changed)."""
        number = _int(lun, "lun")
        zone = next((z for z in self.zones if z.lun == number), None)
        if zone is None:
            raise ExecutionError(f"host {self.owner.name} has no LUN {lun}")
        moved = self.call(lambda: self.client.modify_zone(zone.host, zone.vdisk, lun=_int(to, "to")))
        self.say(f"Host {moved.host} sees {moved.vdisk} as LUN {moved.lun} now.")

    def ui_complete_move(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {"lun": lambda: [str(z.lun) for z in self.zones], "to": lambda: []})

    def ui_command_delete(self, lun: str) -> None:
        """Stop the host seeing the vdisk at lun."""
        number = _int(lun, "lun")
        zone = next((z for z in self.zones if z.lun == number), None)
        if zone is None:
            raise ExecutionError(f"host {self.owner.name} has no LUN {lun}")
        self.call(lambda: self.client.remove_zone(zone.host, zone.vdisk))
        self.say(f"Host {zone.host} no longer sees {zone.vdisk} (LUN {zone.lun}).")

    def ui_complete_delete(self, parameters: dict[str, str], text: str, current_param: str) -> list[str]:
        return _keyword_completions(text, current_param, {"lun": lambda: [str(z.lun) for z in self.zones]})


class LunNode(AttributeNode):
    """One LUN of a host: `set attribute read_only=true` changes the zone's access (`move` in luns, its number)."""

    WRITABLE = frozenset({"read_only"})

    def __init__(self, parent: ConfigNode, client: SanClient, zone: Zone) -> None:
        super().__init__(str(zone.lun), parent, client, {"vdisk": "the vdisk it shows", "lun": "its LUN number",
                                                         "read_only": "true: the host may only read"})  # fmt: skip
        self.zone = zone

    def attributes(self) -> dict[str, Any]:
        return {"vdisk": self.zone.vdisk, "lun": self.zone.lun, "read_only": str(self.zone.read_only).lower()}

    def ui_setgroup_attribute(self, attribute: str, value: str) -> None:
        if attribute == "read_only":
            self.call(lambda: self.client.modify_zone(self.zone.host, self.zone.vdisk, read_only=_bool(value, "read_only")))
        else:
            raise ExecutionError(f"{attribute} cannot be changed")

    def update(self, snapshot: Snapshot) -> None:
        assert isinstance(self.parent, LunsNode)
        self.zone = next(z for z in self.parent.zones if str(z.lun) == self.name)

    def summary(self) -> tuple[str, bool | None]:
        return f"{self.zone.vdisk} ({'read-only' if self.zone.read_only else 'read-write'})", True


# -- gateways and jobs -----------------------------------------------------------------------------------------


class GatewaysNode(SanNode):
    """The gateways registered with the controller (inside `san serve`: the one called local)."""

    def __init__(self, parent: ConfigNode, client: SanClient) -> None:
        super().__init__("gateways", parent, client)

    def update(self, snapshot: Snapshot) -> None:
        self.gateways = snapshot.gateways
        self.sync({g.name: partial(GatewayNode, self, self.client, g) for g in snapshot.gateways}, snapshot)

    def summary(self) -> tuple[str, bool | None]:
        serving = sum(1 for g in self.gateways if g.state == "serving")
        return f"Gateways: {len(self.gateways)}, serving {serving}", serving == len(self.gateways) if self.gateways else None


class GatewayNode(AttributeNode):
    def __init__(self, parent: ConfigNode, client: SanClient, gateway: Gateway) -> None:
        super().__init__(gateway.name, parent, client, {
            "state": "joining, serving or fenced", "lease": "seconds left on its lease", "registrations": "times it registered",
            "sessions": "iSCSI sessions there",
        })  # fmt: skip
        self.gateway = gateway

    def update(self, snapshot: Snapshot) -> None:
        self.gateway = next(g for g in snapshot.gateways if g.name == self.name)

    def attributes(self) -> dict[str, Any]:
        g = self.gateway
        lease = "none" if g.lease_seconds is None else g.lease_seconds
        return {"state": g.state, "lease": lease, "registrations": g.registrations, "sessions": sum(g.sessions.values())}

    def summary(self) -> tuple[str, bool | None]:
        g = self.gateway
        lease = "no lease (in-process)" if g.lease_seconds is None else f"lease {g.lease_seconds:.0f}s"
        sessions = sum(g.sessions.values())
        return f"{g.state}, {lease}, {sessions} session{'s' if sessions != 1 else ''}", g.state == "serving"


class JobsNode(SanNode):
    """Work running in the background: thick vdisks being allocated (later: flatten, migration)."""

    def __init__(self, parent: ConfigNode, client: SanClient) -> None:
        super().__init__("jobs", parent, client)

    def update(self, snapshot: Snapshot) -> None:
        self.running = [v for v in snapshot.vdisks if v.state == "allocating"]
        self.sync({f"allocate-{v.name}": partial(JobNode, self, self.client, v) for v in self.running}, snapshot)

    def summary(self) -> tuple[str, bool | None]:
        return f"Jobs: {len(self.running)} running", None


class JobNode(SanNode):
    def __init__(self, parent: JobsNode, client: SanClient, vdisk: VDisk) -> None:
        super().__init__(f"allocate-{vdisk.name}", parent, client)
        self.vdisk = vdisk

    def update(self, snapshot: Snapshot) -> None:
        self.vdisk = next(v for v in snapshot.vdisks if f"allocate-{v.name}" == self.name)

    def summary(self) -> tuple[str, bool | None]:
        return f"allocating {self.vdisk.name}: {self.vdisk.progress * 100:.0f}%", True
