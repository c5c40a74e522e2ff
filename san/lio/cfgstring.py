"""The cfgstring of a `user:san` storage object made in targetcli (`cfgstring=pool=fast`, later bound by san to its
vdisk: `pool=fast;vdisk=<id>;serial=<serial>`): what it may say, read, and what the handler serves of such objects."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SUBTYPE = "san"  # the handler name: user:san in targetcli, san/<config> in dev_config
MAX_LENGTH = 160  # the kernel keeps 256 bytes of dev_config, "san/" and san's binding included
SEPARATOR = ";"  # the kernel cuts LIO's control string at commas: a comma would end dev_config early
DESCRIPTION = (
    "pool=<pool>: san makes a thin vdisk named after the storage object, of its size and block size, in that pool "
    "(san pool list shows the pools), and adds ;vdisk=<id>;serial=<serial> so saveconfig and restarts keep it. "
    "Deleting the storage object leaves the vdisk; san vdisk delete removes both."
)
KEYS = ("pool", "vdisk", "serial")


@dataclass
class Served:
    """The handler's devices made in targetcli, by `user_<hba>/<object>`: the vdisk (id, serial) each serves, those
    whose unit is retired (their vdisk went: not served now), those whose device name has no binding yet."""

    vdisks: dict[str, tuple[int, str]] = field(default_factory=dict)
    retired: set[str] = field(default_factory=set)
    unbound: set[str] = field(default_factory=set)


class CfgStringError(ValueError):
    """A cfgstring san does not take; the message says why, in one line."""


@dataclass(frozen=True)
class UserConfig:
    """What an admin's cfgstring asks for: a new vdisk in pool, or (once bound) the vdisk with this id and serial."""

    pool: str
    vdisk: int | None = None
    serial: str | None = None

    @property
    def binding(self) -> tuple[int, str] | None:
        return (self.vdisk, self.serial) if self.vdisk is not None and self.serial is not None else None

    def bound(self, vdisk: int, serial: str) -> str:
        """This cfgstring bound to a vdisk (what san writes to the object's dev_config once it serves it)."""
        return SEPARATOR.join((f"pool={self.pool}", f"vdisk={vdisk}", f"serial={serial}"))


def is_vdisk_id(config: str) -> bool:
    """Whether a config (after `san/`) is one of san's own: a vdisk id."""
    return re.fullmatch(r"[1-9][0-9]*", config) is not None


def parse(config: str) -> UserConfig:
    """A cfgstring as `key=value` pairs separated by semicolons (`pool` required; `vdisk` and `serial` together);
    CfgStringError when it is not."""
    if len(config) > MAX_LENGTH:
        raise CfgStringError(f"cfgstring is {len(config)} characters; at most {MAX_LENGTH}")
    if not config:
        raise CfgStringError("cfgstring is empty; give pool=<pool>")
    if any(c in ",:" or c.isspace() or not c.isprintable() for c in config):
        raise CfgStringError(f"separate cfgstring items with {SEPARATOR!r}, without commas, colons, spaces or control characters")
    values: dict[str, str] = {}
    for item in config.split(SEPARATOR):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise CfgStringError(f"{item!r} is not key=value; give pool=<pool>")
        if key not in KEYS:
            raise CfgStringError(f"unknown key {key!r}; the keys are {', '.join(KEYS)}")
        if key in values:
            raise CfgStringError(f"{key} is given twice")
        values[key] = value
    if "pool" not in values:
        raise CfgStringError("no pool; give pool=<pool>")
    if ("vdisk" in values) != ("serial" in values):
        raise CfgStringError("vdisk and serial go together (san writes them once the vdisk is made)")
    if "vdisk" in values and not is_vdisk_id(values["vdisk"]):
        raise CfgStringError(f"vdisk={values['vdisk']} is not a vdisk id")
    vdisk = int(values["vdisk"]) if "vdisk" in values else None
    return UserConfig(values["pool"], vdisk, values.get("serial"))


def of_device(config: str) -> str:
    """The cfgstring of a full dev_config (`san/<cfgstring>`); CfgStringError for another handler's."""
    if len(config) > MAX_LENGTH + len(SUBTYPE) + 1:
        raise CfgStringError(f"config is {len(config)} characters; at most {MAX_LENGTH + len(SUBTYPE) + 1}")
    subtype, sep, rest = config.partition("/")
    if not sep or subtype != SUBTYPE:
        raise CfgStringError(f"{config!r} is not for handler {SUBTYPE} ({SUBTYPE}/<cfgstring>)")
    return rest
