"""LioConfig's choice of storage object per vdisk, against a fake configfs (rtslib's objects as plain fakes): san's
own objects, an admin's made in targetcli (served, not yet served, or outliving their vdisk), and vdisks being made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import rtslib

from san.lio.config import LioConfig, Wanted
from san.model import VDisk

CORE = "/sys/kernel/config/target/core"


@dataclass
class FakeObject:
    """What LioConfig reads of an rtslib storage object, and what it may do to it."""

    name: str
    config: str
    index: int
    size: int = 64 << 20
    plugin: str = "user"
    deleted: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"{CORE}/user_{self.index}/{self.name}"

    def delete(self) -> None:
        self.deleted.append(self.name)

    def set_attribute(self, name: str, value: str) -> None:
        assert name == "dev_size"
        self.size = int(value)


@dataclass
class FakeRoot:
    storage_objects: list[FakeObject]


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[FakeObject]:
    """The storage objects LioConfig makes (in place of rtslib's constructor, which needs configfs)."""
    made: list[FakeObject] = []

    def make(name: str, config: str, size: int, **_: Any) -> FakeObject:
        so = FakeObject(name, config, 100 + len(made), size)
        made.append(so)
        return so

    monkeypatch.setattr(rtslib, "UserBackedStorageObject", make)
    return made


def vdisk(vdisk_id: int, name: str, size: int = 64 << 20) -> VDisk:
    return VDisk(vdisk_id, name, 1, size, 512, True, f"serial{vdisk_id}")


def choose(root: FakeRoot, wanted: Wanted) -> dict[int, str]:
    objects = LioConfig("iqn.2003-01.org.san:t", [])._storage_objects(root, wanted)
    return {vdisk_id: so.path.removeprefix(CORE + "/") for vdisk_id, so in objects.items()}


def test_admins_objects_with_the_same_cfgstring_each_serve_their_vdisk(created: list[FakeObject]) -> None:
    """Two objects made with cfgstring=pool=fast are two vdisks' objects; no object of san's is made for them."""
    root = FakeRoot([FakeObject("vm1", "san/pool=fast", 1), FakeObject("vm2", "san/pool=fast", 2)])
    wanted = Wanted([vdisk(1, "vm1"), vdisk(2, "vm2")], adopted={"user_1/vm1": (1, "serial1"), "user_2/vm2": (2, "serial2")})
    assert choose(root, wanted) == {1: "user_1/vm1", 2: "user_2/vm2"}
    assert created == [] and all(not so.deleted for so in root.storage_objects)


def test_an_admins_object_goes_with_its_vdisk_and_only_then(created: list[FakeObject]) -> None:
    """Deleted vdisk (or its id reused by a new vdisk): the admin's object goes; one san does not serve stays, and
    no object of san's is made under its name (the handler takes it over)."""
    gone = FakeObject("vm1", "san/pool=fast", 1)
    reused = FakeObject("vm2", "san/pool=fast", 2)
    unserved = FakeObject("vm3", "san/pool=fast", 3)
    foreign = FakeObject("img", "rbd/pool/img", 4)
    root = FakeRoot([gone, reused, unserved, foreign])
    wanted = Wanted([vdisk(2, "other"), vdisk(3, "vm3")], adopted={"user_1/vm1": (1, "serial1"), "user_2/vm2": (2, "old")})
    assert choose(root, wanted) == {2: "user_100/other"}
    assert (gone.deleted, reused.deleted, unserved.deleted, foreign.deleted) == (["vm1"], ["vm2"], [], [])
    assert [so.name for so in created] == ["other"]


def test_vdisks_being_made_for_targetcli_get_no_object_of_sans(created: list[FakeObject]) -> None:
    root = FakeRoot([FakeObject("vm1", "san/pool=fast", 1)])
    assert choose(root, Wanted([vdisk(1, "vm1")], adopting={"vm1"})) == {}
    assert created == []


def test_sans_own_object_is_kept_before_an_admins_and_both_follow_a_grow(created: list[FakeObject]) -> None:
    """A vdisk with san's object and an admin's keeps its LUN on san's (no LUN moves); a grown vdisk's served
    admin's object gets the new size; a plain vdisk gets an object of san's."""
    own = FakeObject("disk0", "san/1", 0)
    admins = FakeObject("vm1", "san/pool=fast", 1)
    root = FakeRoot([own, admins])
    wanted = Wanted(
        [vdisk(1, "disk0"), vdisk(2, "vm1", 128 << 20), vdisk(3, "disk3")],
        adopted={"user_1/vm1": (2, "serial2")},
    )
    assert choose(root, wanted) == {1: "user_0/disk0", 2: "user_1/vm1", 3: "user_100/disk3"}
    assert admins.size == 128 << 20 and not own.deleted and not admins.deleted
    both = FakeRoot([FakeObject("disk0", "san/1", 0), FakeObject("copy", "san/pool=fast", 1)])
    assert choose(both, Wanted([vdisk(1, "disk0")], adopted={"user_1/copy": (1, "serial1")})) == {1: "user_0/disk0"}
