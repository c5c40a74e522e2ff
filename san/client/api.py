"""SanClient: one method per API operation, taking and returning the models (san/client/models.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from san.client.errors import ApiError
from san.client.models import Gateway, Host, M, Pool, Session, Status, VDisk, Zone
from san.client.transport import Transport


def _name(name: str) -> str:
    return quote(name, safe="")


def _answer(kind: type[M], answer: Any) -> M:
    try:
        return kind.from_json(answer)
    except ValueError as exc:
        raise ApiError(f"the API answered an unexpected {kind.__name__}: {exc}") from None


class SanClient(Transport):
    """One san API (`san serve` or `san controller`), with its token; see Transport for how it connects."""

    def status(self) -> Status:
        return _answer(Status, self.get("/status"))

    def gateways(self) -> list[Gateway]:
        return [_answer(Gateway, g) for g in self.get("/gateways")]

    def sessions(self) -> list[Session]:
        return [_answer(Session, s) for s in self.get("/sessions")]

    def metrics(self) -> str:
        """The Prometheus exposition text of /metrics."""
        return self.text("/metrics")

    # -- pools ---------------------------------------------------------------------------------------------

    def pools(self) -> list[Pool]:
        return [_answer(Pool, p) for p in self.get("/pools")]

    def pool(self, name: str) -> Pool:
        return _answer(Pool, self.get(f"/pools/{_name(name)}"))

    def create_pool(
        self,
        name: str,
        size: int | str | None = None,
        path: str | None = None,
        existing: bool = False,
        segment_size: int | str | None = None,
        warn_percent: int | None = None,
        allocate_ahead: int | None = None,
    ) -> Pool:
        body: dict[str, Any] = {"name": name, "size": size, "path": path, "existing": existing}
        optional = {"segment_size": segment_size, "warn_percent": warn_percent, "allocate_ahead": allocate_ahead}
        body.update({k: v for k, v in optional.items() if v is not None})
        return _answer(Pool, self.post("/pools", body))

    def delete_pool(self, name: str) -> None:
        self.delete(f"/pools/{_name(name)}")

    # -- vdisks --------------------------------------------------------------------------------------------

    def vdisks(self) -> list[VDisk]:
        return [_answer(VDisk, v) for v in self.get("/vdisks")]

    def vdisk(self, name: str) -> VDisk:
        return _answer(VDisk, self.get(f"/vdisks/{_name(name)}"))

    def create_vdisk(self, name: str, pool: str, size: int | str, thick: bool = False, block_size: int = 512) -> VDisk:
        """A thin vdisk, or a thick one whose allocation runs on (state allocating, progress) after this returns."""
        body = {"name": name, "pool": pool, "size": size, "thick": thick, "block_size": block_size}
        return _answer(VDisk, self.post("/vdisks", body))

    def grow_vdisk(self, name: str, size: int | str) -> VDisk:
        return _answer(VDisk, self.post(f"/vdisks/{_name(name)}/grow", {"size": size}))

    def rename_vdisk(self, name: str, new_name: str) -> VDisk:
        return _answer(VDisk, self.post(f"/vdisks/{_name(name)}/rename", {"name": new_name}))

    def delete_vdisk(self, name: str) -> None:
        self.delete(f"/vdisks/{_name(name)}")

    # -- snapshots -----------------------------------------------------------------------------------------

    def snapshots(self, vdisk: str | None = None) -> list[VDisk]:
        """A vdisk's snapshots (oldest first), or every vdisk's."""
        path = f"/vdisks/{_name(vdisk)}/snapshots" if vdisk is not None else "/snapshots"
        return [_answer(VDisk, v) for v in self.get(path)]

    def create_snapshot(self, vdisk: str, name: str) -> VDisk:
        return _answer(VDisk, self.post(f"/vdisks/{_name(vdisk)}/snapshots", {"name": name}))

    def delete_snapshot(self, vdisk: str, name: str) -> None:
        self.delete(f"/vdisks/{_name(vdisk)}/snapshots/{_name(name)}")

    # -- hosts and zones -----------------------------------------------------------------------------------

    def hosts(self, secrets: bool = False) -> list[Host]:
        """Every host; with secrets, their CHAP secrets too."""
        return [_answer(Host, h) for h in self.get("/hosts?secrets=true" if secrets else "/hosts")]

    def host(self, name: str) -> Host:
        return _answer(Host, self.get(f"/hosts/{_name(name)}"))

    def create_host(
        self, name: str, iqn: str, chap_user: str = "", chap_secret: str = "", mutual_user: str = "", mutual_secret: str = ""
    ) -> Host:
        """A host; its warnings say what is unsafe about it (no CHAP)."""
        body = {"name": name, "iqn": iqn, "chap_user": chap_user, "chap_secret": chap_secret,
                "mutual_user": mutual_user, "mutual_secret": mutual_secret}  # fmt: skip
        return _answer(Host, self.post("/hosts", body))

    def modify_host(self, name: str, **changes: str) -> Host:
        """Change iqn, chap_user, chap_secret, mutual_user or mutual_secret (chap_user="" removes CHAP)."""
        return _answer(Host, self.patch(f"/hosts/{_name(name)}", changes))

    def delete_host(self, name: str) -> None:
        self.delete(f"/hosts/{_name(name)}")

    def zones(self) -> list[Zone]:
        return [_answer(Zone, z) for z in self.get("/zones")]

    def add_zone(self, host: str, vdisk: str, lun: int | None = None, read_only: bool = False) -> Zone:
        body = {"host": host, "vdisk": vdisk, "lun": lun, "read_only": read_only}
        return _answer(Zone, self.post("/zones", body))

    def modify_zone(self, host: str, vdisk: str, lun: int | None = None, read_only: bool | None = None) -> Zone:
        body = {k: v for k, v in (("lun", lun), ("read_only", read_only)) if v is not None}
        return _answer(Zone, self.patch(f"/zones/{_name(host)}/{_name(vdisk)}", body))

    def remove_zone(self, host: str, vdisk: str) -> None:
        self.delete(f"/zones/{_name(host)}/{_name(vdisk)}")
