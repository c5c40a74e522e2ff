"""What a gateway knows of the controller's configuration: the last Config it was sent, and lookups over it.

Only ready vdisks are in it; hosts carry their CHAP credentials; zones say which host sees which vdisk at which LUN."""

from __future__ import annotations

from dataclasses import dataclass, field

from san.model import Host, VDisk, Zone, host_by_iqn
from san.protocol.messages import Config


@dataclass
class View:
    """One Config, indexed."""

    version: int = 0
    vdisks: dict[int, VDisk] = field(default_factory=dict)
    hosts: dict[int, Host] = field(default_factory=dict)
    zones: list[Zone] = field(default_factory=list)
    above_threshold: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, config: Config) -> View:
        return cls(
            config.version,
            {v.id: v for v in config.vdisks},
            {h.id: h for h in config.hosts},
            list(config.zones),
            set(config.above_threshold),
        )

    def by_iqn(self, iqn: str) -> Host | None:
        return host_by_iqn(self.hosts.values(), iqn)

    def zones_of(self, host: Host) -> list[Zone]:
        return [z for z in self.zones if z.host_id == host.id and z.vdisk_id in self.vdisks]
