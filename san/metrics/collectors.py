"""What /metrics shows: the controller's figures (pools, vdisk allocation, grants, gateways, host sessions, store
commits) and a gateway's (its vdisks' I/O, fault resolution, its lease and registrations, its iSCSI sessions).

Each collector reads live state at scrape time on the event loop; `san serve` registers both in one registry."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from san.metrics.io import vdisk_io

if TYPE_CHECKING:
    from san.agent.agent import Agent
    from san.controller.controller import Controller
    from san.gateway.session import ControllerSession
    from san.iscsi.target import Target

COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ControllerCollector(Collector):
    """The controller's state: pools, vdisks, grants, gateways, sessions per host and metadata commit latency."""

    def __init__(self, controller: Controller, sessions: Callable[[str], int | None]) -> None:
        self.controller = controller
        self.sessions = sessions
        self.commit_seconds = Histogram(
            "san_metadata_commit_seconds",
            "Time each metadata transaction took, begin to durable commit",
            registry=None,
            buckets=COMMIT_BUCKETS,
        )
        controller.metadata.observe_commit = self.commit_seconds.observe

    def collect(self) -> Iterator[Metric]:
        yield from self._pools()
        yield from self._vdisks()
        yield from self._gateways()
        yield from self.commit_seconds.collect()
        snapshots = self.controller.snapshots
        reclaimed = CounterMetricFamily(
            "san_snapshot_reclaimed_versions", "Kept mapping versions dropped once no snapshot saw them (deleted snapshots)"
        )
        reclaimed.add_metric([], snapshots.reclaimed)
        count = GaugeMetricFamily("san_snapshots", "Snapshots, by vdisk", labels=["vdisk"])
        for vdisk in sorted((v for v in self.controller.vdisks.values() if not v.origin), key=lambda v: v.name):
            count.add_metric([vdisk.name], len(snapshots.of(vdisk)))
        yield from (reclaimed, count)

    def _pools(self) -> Iterator[Metric]:
        controller = self.controller
        gauges = {
            key: GaugeMetricFamily(f"san_pool_{key}_bytes", text, labels=["pool"])
            for key, text in (
                ("capacity", "Bytes of storage the pool's containers hold"),
                ("used", "Bytes of it mapped by vdisks"),
                ("free", "Bytes of it no vdisk maps (the reserve and grants included)"),
                ("provisioned", "Sum of the sizes of the pool's vdisks"),
                ("reserve", "Bytes of zeroed segments ready to hand out"),
            )
        }
        online = GaugeMetricFamily("san_pool_online", "1 when the pool's storage is attached, 0 when offline", labels=["pool"])
        for pool in controller.pools.values():
            usage = controller.usage(pool)
            reserve = len(controller.allocators[pool.id].reserve) * pool.segment_size
            figures = {
                "capacity": usage.capacity_bytes,
                "used": usage.used_bytes,
                "free": usage.free_bytes,
                "provisioned": usage.provisioned_bytes,
                "reserve": reserve,
            }
            for key, family in gauges.items():
                family.add_metric([pool.name], figures[key])
            online.add_metric([pool.name], 0 if pool.id in controller.offline else 1)
        yield from gauges.values()
        yield online

    def _vdisks(self) -> Iterator[Metric]:
        controller = self.controller
        size = GaugeMetricFamily("san_vdisk_size_bytes", "The vdisk's size as hosts see it", labels=["vdisk", "pool"])
        allocated = GaugeMetricFamily(
            "san_vdisk_allocated_bytes", "Bytes of pool storage mapped to the vdisk", labels=["vdisk", "pool"]
        )
        granted = GaugeMetricFamily(
            "san_grant_segments", "Segments granted to a gateway to map on its own, not yet used", labels=["vdisk", "gateway"]
        )
        for vdisk in controller.vdisks.values():
            values = [vdisk.name, controller.pools[vdisk.pool_id].name]
            size.add_metric(values, vdisk.size_bytes)
            allocated.add_metric(values, controller.allocated_bytes(vdisk))
        policy = controller.policy
        for vdisk_id, segments in policy.grants.items():
            holder = controller.vdisks.get(vdisk_id)
            if holder is not None and segments:
                granted.add_metric([holder.name, policy.owners.get(vdisk_id, "")], len(segments))
        yield from (size, allocated, granted)

    def _gateways(self) -> Iterator[Metric]:
        agents = self.controller.agents
        now = time.monotonic()
        lease = GaugeMetricFamily(
            "san_gateway_lease_seconds",
            "Seconds left on each registered gateway's lease (+Inf for the one inside `san serve`)",
            labels=["gateway"],
        )
        fenced = GaugeMetricFamily("san_gateway_fenced", "1 when the gateway is fenced", labels=["gateway"])
        registrations = CounterMetricFamily(
            "san_gateway_registrations", "Registrations of each gateway since the controller started", labels=["gateway"]
        )
        for session in agents.sessions:
            lease.add_metric([session.name], max(session.renewed + session.lease - now, 0.0))
            fenced.add_metric([session.name], 1 if session.fenced else 0)
        for name, count in agents.registrations.items():
            registrations.add_metric([name], count)
        sessions = GaugeMetricFamily("san_host_sessions", "iSCSI sessions of each host, on every gateway", labels=["host"])
        for host in self.controller.zoning.hosts.values():
            live = self.sessions(host.iqn)
            if live is not None:
                sessions.add_metric([host.name], live)
        yield from (lease, fenced, registrations, sessions)


class GatewayCollector(Collector):
    """One gateway's figures: I/O of the vdisks it serves, fault resolution, lease and registrations, sessions."""

    def __init__(
        self,
        agent: Agent,
        names: Callable[[int], str | None],
        target: Target,
        session: ControllerSession | None = None,
    ) -> None:
        self.agent = agent
        self.names = names
        self.target = target
        self.session = session

    def collect(self) -> Iterator[Metric]:
        tables = []
        for vdisk_id, volume in sorted(self.agent.volumes.items()):
            name = self.names(vdisk_id)
            if name is not None:
                tables.append((name, volume.table))
        yield from vdisk_io(tables)
        yield from self.agent.fault_seconds.collect()
        copies = CounterMetricFamily(
            "san_copy_on_write_alternates", "Alternate locations taken for writes into segments a snapshot shares"
        )
        copies.add_metric([], self.agent.copies_on_write)
        copied = CounterMetricFamily(
            "san_copy_on_write_copied_bytes",
            "Bytes copied for copy on write besides what hosts wrote (a shared alternate location's blocks, moved on)",
        )
        copied.add_metric([], self.agent.copied_bytes)
        yield from (copies, copied)
        initiators = GaugeMetricFamily(
            "san_iscsi_sessions", "iSCSI sessions on this gateway's built-in target, by initiator", labels=["initiator"]
        )
        for initiator, count in sorted(Counter(s.initiator for s in self.target.sessions.values() if s.initiator).items()):
            initiators.add_metric([initiator], count)
        yield initiators
        session = self.session
        if session is not None:
            valid = GaugeMetricFamily("san_gateway_lease_valid", "1 while this gateway's lease holds, 0 once it lapsed")
            valid.add_metric([], 0 if session.expired else 1)
            registered = CounterMetricFamily("san_gateway_registered", "Times this gateway registered with a controller")
            registered.add_metric([], session.registrations)
            yield from (valid, registered)
