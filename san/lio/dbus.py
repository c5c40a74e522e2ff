"""The D-Bus face of san's TCMU handler: `org.kernel.TCMUService1` on the system bus, as tcmu-runner exports it, so
stock targetcli lists `user:san` under /backstores, prints its cfgstring help and has each cfgstring checked."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from dbus_fast import BusType, DBusError, NameFlag, PropertyAccess, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_property, method

from san.lio.cfgstring import DESCRIPTION, SUBTYPE, CfgStringError, of_device

log = logging.getLogger("san.lio")

BUS_NAME = "org.kernel.TCMUService1"
ROOT_PATH = "/org/kernel/TCMUService1"  # targetcli asks its ObjectManager for the handlers, one object each
INTERFACE = "org.kernel.TCMUService1"

Check = Callable[[str], str | None]  # a cfgstring -> why it is refused, or None


class HandlerInterface(ServiceInterface):
    """One handler's object: its cfgstring help (ConfigDesc) and CheckConfig, which targetcli calls before it creates
    a storage object (and refuses to when the answer is false)."""

    def __init__(self, check: Check) -> None:
        super().__init__(INTERFACE)
        self.check = check

    @dbus_property(access=PropertyAccess.READ)
    def ConfigDesc(self) -> DBusStr:
        return DESCRIPTION

    @method()
    def CheckConfig(self, config: DBusStr) -> Annotated[tuple[bool, str], DBusSignature("bs")]:
        try:
            refused = self.check(of_device(config))
        except CfgStringError as exc:
            refused = str(exc)
        except Exception:
            log.exception("CheckConfig(%r) failed", config[:300])
            refused = "san could not check it; see san's log"
        if refused is not None:
            log.info("targetcli: cfgstring %r refused: %s", config[:300], refused)
            return (False, refused)
        return (True, "")


class TcmuService:
    """The name and objects on the system bus while the LIO frontend runs; start() never fails the frontend (without
    a system bus, or with the name taken, targetcli just does not list user:san, and the log says why)."""

    def __init__(self, check: Check) -> None:
        self.interface = HandlerInterface(check)
        self.bus: MessageBus | None = None
        self.refusal: str | None = None  # why user:san is not on the bus, while it is not

    async def start(self) -> bool:
        try:
            bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        except (OSError, DBusError, EOFError) as exc:
            self.refusal = f"no D-Bus system bus ({exc}): targetcli will not list user:{SUBTYPE}"
            log.warning("%s", self.refusal)
            return False
        bus.export(f"{ROOT_PATH}/{SUBTYPE}", self.interface)
        try:
            reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as exc:
            reply = None
            self.refusal = f"the system bus refused {BUS_NAME} ({exc.text}): install systemd/san-dbus.conf"
        else:
            if reply is not RequestNameReply.PRIMARY_OWNER:
                self.refusal = f"{BUS_NAME} is owned by another process (tcmu-runner?): targetcli will not list user:{SUBTYPE}"
        if reply is not RequestNameReply.PRIMARY_OWNER:
            log.warning("%s", self.refusal)
            bus.disconnect()
            return False
        self.bus = bus
        self.refusal = None
        log.info("user:%s is on the system bus as %s", SUBTYPE, BUS_NAME)
        return True

    async def stop(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None
