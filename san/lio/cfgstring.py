"""The cfgstring of a `user:san` storage object made in targetcli (`cfgstring=pool=fast`): what it may say, read.

san's own storage objects carry `san/<vdisk id>`; one made by an admin names the pool its new vdisk is made in."""

from __future__ import annotations

from dataclasses import dataclass

SUBTYPE = "san"  # the handler name: user:san in targetcli, san/<config> in dev_config
MAX_LENGTH = 200  # the kernel keeps 256 bytes of dev_config, "san/" included; the UIO name holds it too
DESCRIPTION = (
    "pool=<pool>: san makes a thin vdisk named after the storage object, of its size and block size, in that pool "
    "(san pool list shows the pools). Deleting the storage object leaves the vdisk; san vdisk delete removes it."
)


class CfgStringError(ValueError):
    """A cfgstring san does not take; the message says why, in one line."""


@dataclass(frozen=True)
class UserConfig:
    """What an admin's cfgstring asks for."""

    pool: str


def is_vdisk_id(config: str) -> bool:
    """Whether a config (after `san/`) is one of san's own: a vdisk id."""
    return config.isdigit()


def parse(config: str) -> UserConfig:
    """A cfgstring as `key=value` pairs separated by commas (`pool` is required); CfgStringError when it is not."""
    if len(config) > MAX_LENGTH:
        raise CfgStringError(f"cfgstring is {len(config)} characters; at most {MAX_LENGTH}")
    if not config:
        raise CfgStringError("cfgstring is empty; give pool=<pool>")
    values: dict[str, str] = {}
    for item in config.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise CfgStringError(f"{item!r} is not key=value; give pool=<pool>")
        if key != "pool":
            raise CfgStringError(f"unknown key {key!r}; the only key is pool")
        if key in values:
            raise CfgStringError(f"{key} is given twice")
        values[key] = value
    return UserConfig(values["pool"])


def of_device(config: str) -> str:
    """The cfgstring of a full dev_config (`san/<cfgstring>`); CfgStringError for another handler's."""
    subtype, sep, rest = config.partition("/")
    if not sep or subtype != SUBTYPE:
        raise CfgStringError(f"{config!r} is not for handler {SUBTYPE} ({SUBTYPE}/<cfgstring>)")
    return rest
