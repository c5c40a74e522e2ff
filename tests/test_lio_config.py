"""LioConfig's choice of storage object per vdisk, against a fake configfs (rtslib's objects as plain fakes): san's
own objects, an admin's made in targetcli (served, bound, not served, outliving their vdisk), foreign backstores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import rtslib
from rtslib.utils import RTSLibError

from san.lio.cfgstring import Served
from san.lio.config import LioConfig, Wanted
from san.model import VDisk

CORE = "/sys/kernel/config/target/core"


@dataclass
class FakeObject:
    """What LioConfig reads of an rtslib user-backed storage object, and what it may do to it."""

    name: str
    config: str
    index: int
    size: int = 64 << 20
    wwn: str = ""
    plugin: str = "user"
    configured: bool = True
    deleted: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"{CORE}/user_{self.index}/{self.name}"

    def is_configured(self) -> bool:
        return self.configured

    def delete(self) -> None:
        self.deleted.append(self.name)

    def set_attribute(self, name: str, value: str) -> None:
        if name == "dev_size":
            self.size = int(value)
        else:
            assert name == "dev_config"
            self.config = value


@dataclass
class FakeFileObject:
    """An rtslib fileio storage object: it has no config attribute at all."""

    name: str
    plugin: str = "fileio"
    deleted: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"{CORE}/fileio_0/{self.name}"

    def delete(self) -> None:
        self.deleted.append(self.name)


@dataclass
class FakeRoot:
    storage_objects: list[Any]


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[FakeObject]:
    """The storage objects LioConfig makes (in place of rtslib's constructor, which needs configfs); a vdisk named
    `broken` cannot get one."""
    made: list[FakeObject] = []

    def make(name: str, config: str, size: int, wwn: str, **_: Any) -> FakeObject:
        if name == "broken":
            raise RTSLibError("Cannot create storage object")
        so = FakeObject(name, config, 100 + len(made), size, wwn)
        made.append(so)
        return so

    monkeypatch.setattr(rtslib, "UserBackedStorageObject", make)
    return made


def vdisk(vdisk_id: int, name: str, size: int = 64 << 20) -> VDisk:
    return VDisk(vdisk_id, name, 1, size, 512, True, f"serial{vdisk_id}")


def choose(root: FakeRoot, wanted: Wanted, problems: list[str] | None = None) -> dict[int, str]:
    objects = LioConfig("iqn.2003-01.org.san:t", [])._storage_objects(root, wanted, [] if problems is None else problems)
    return {vdisk_id: so.path.removeprefix(CORE + "/") for vdisk_id, so in objects.items()}


def test_admins_objects_with_the_same_cfgstring_each_serve_their_vdisk_and_are_bound_to_it(
    created: list[FakeObject],
) -> None:
    """Two objects made with cfgstring=pool=fast are two vdisks' objects; each gets its binding in dev_config (once);
    no object of san's is made for them."""
    vm1, vm2 = FakeObject("vm1", "san/pool=fast", 1), FakeObject("vm2", "san/pool=fast;vdisk=2;serial=serial2", 2)
    root = FakeRoot([vm1, vm2])
    wanted = Wanted(
        [vdisk(1, "vm1"), vdisk(2, "vm2")], adopted=Served({"user_1/vm1": (1, "serial1"), "user_2/vm2": (2, "serial2")})
    )
    assert choose(root, wanted) == {1: "user_1/vm1", 2: "user_2/vm2"}
    assert vm1.config == "san/pool=fast;vdisk=1;serial=serial1"
    assert vm2.config == "san/pool=fast;vdisk=2;serial=serial2"
    assert created == [] and all(not so.deleted for so in root.storage_objects)


def test_an_admins_object_goes_only_when_its_vdisk_is_known_deleted(created: list[FakeObject]) -> None:
    """Bound to a vdisk the controller deleted, or whose id a new vdisk took: the object goes. Bound to one that is
    only not ready (its pool offline), or unknown here (another controller's): it stays, and san makes no object of
    its own for that vdisk. Not bound and not served: it stays and holds its name. Other handlers' and other
    backstores' objects are never touched (a fileio object has no config at all)."""
    gone = FakeObject("vm1", "san/pool=fast;vdisk=1;serial=serial1", 1)
    reused = FakeObject("vm2", "san/pool=fast;vdisk=2;serial=old", 2)
    offline = FakeObject("vm5", "san/pool=fast;vdisk=5;serial=serial5", 5)
    unbound = FakeObject("vm3", "san/pool=fast", 3)
    foreign = FakeObject("img", "rbd/pool/img", 4)
    fileio = FakeFileObject("file0")
    root = FakeRoot([gone, reused, offline, unbound, foreign, fileio])
    wanted = Wanted([vdisk(2, "other"), vdisk(3, "vm3")], deleted={"serial1"})
    assert choose(root, wanted) == {2: "user_100/other"}
    assert [so.deleted for so in root.storage_objects] == [["vm1"], ["vm2"], [], [], [], []]
    assert [so.name for so in created] == ["other"]
    kept = FakeRoot([FakeObject("vm1", "san/pool=fast;vdisk=1;serial=serial1", 1)])
    assert choose(kept, Wanted([vdisk(7, "vm7")], deleted={"serial9"})) == {7: "user_101/vm7"}
    assert not kept.storage_objects[0].deleted and len(created) == 2


def test_a_renamed_vdisk_stays_with_the_admins_object_it_is_bound_to(created: list[FakeObject]) -> None:
    """vm1 (bound to vdisk 1) renamed to db and a new vdisk named vm1: the object vm1 stays vdisk 1's; the new vm1
    gets no object (the name is taken), and nothing is deleted."""
    bound = FakeObject("vm1", "san/pool=fast;vdisk=1;serial=serial1", 1)
    root = FakeRoot([bound])
    wanted = Wanted([vdisk(1, "db"), vdisk(7, "vm1")], adopted=Served({"user_1/vm1": (1, "serial1")}))
    assert choose(root, wanted) == {1: "user_1/vm1"}
    assert created == [] and not bound.deleted


def test_vdisks_being_made_for_targetcli_get_no_object_of_sans(created: list[FakeObject]) -> None:
    root = FakeRoot([FakeObject("vm1", "san/pool=fast", 1)])
    assert choose(root, Wanted([vdisk(1, "vm1")], adopting={"vm1"})) == {}
    assert created == []


def test_sans_own_object_is_kept_before_an_admins_and_both_follow_a_grow(created: list[FakeObject]) -> None:
    """A vdisk with san's object and an admin's keeps its LUN on san's (no LUN moves); a grown vdisk's served
    admin's object gets the new size; a plain vdisk gets an object of san's; san's object whose serial is not its
    vdisk's (the id was reused) is remade."""
    own = FakeObject("disk0", "san/1", 0, wwn="serial1")
    stale = FakeObject("disk4", "san/4", 0, wwn="serial-of-a-deleted-vdisk")
    admins = FakeObject("vm1", "san/pool=fast", 1)
    root = FakeRoot([own, stale, admins])
    wanted = Wanted(
        [vdisk(1, "disk0"), vdisk(2, "vm1", 128 << 20), vdisk(3, "disk3"), vdisk(4, "disk4")],
        adopted=Served({"user_1/vm1": (2, "serial2")}),
    )
    assert choose(root, wanted) == {1: "user_0/disk0", 2: "user_1/vm1", 3: "user_100/disk3", 4: "user_101/disk4"}
    assert admins.size == 128 << 20 and not own.deleted and not admins.deleted and stale.deleted == ["disk4"]
    both = FakeRoot([FakeObject("disk0", "san/1", 0, wwn="serial1"), FakeObject("copy", "san/pool=fast", 1)])
    assert choose(both, Wanted([vdisk(1, "disk0")], adopted=Served({"user_1/copy": (1, "serial1")}))) == {1: "user_0/disk0"}


def test_one_object_that_cannot_be_made_does_not_stop_the_others(created: list[FakeObject]) -> None:
    problems: list[str] = []
    assert choose(FakeRoot([]), Wanted([vdisk(1, "broken"), vdisk(2, "fine")]), problems) == {2: "user_100/fine"}
    assert problems == ["vdisk broken: Cannot create storage object"]


def test_an_admins_object_whose_vdisk_went_before_it_was_bound_goes_too(created: list[FakeObject]) -> None:
    """Deleted right after targetcli made it (dev_config not bound yet): the handler's device still names the vdisk,
    so the object goes; one whose vdisk is only offline stays, and is not bound while it serves nothing."""
    quick, offline = FakeObject("vm2", "san/pool=fast", 2), FakeObject("vm3", "san/pool=fast", 3)
    adopted = {"user_2/vm2": (2, "serial2"), "user_3/vm3": (3, "serial3")}
    wanted = Wanted([], adopted=Served(adopted, retired={"user_2/vm2", "user_3/vm3"}), deleted={"serial2"})
    assert choose(FakeRoot([quick, offline]), wanted) == {}
    assert (quick.deleted, offline.deleted, offline.config) == (["vm2"], [], "san/pool=fast")
    assert created == []


def test_the_binding_is_written_once_lio_has_the_object_configured_and_until_the_device_has_it(
    created: list[FakeObject],
) -> None:
    """Not yet configured (the kernel has not finished enabling it): dev_config is left alone, as a write then
    reaches neither the handler nor the device's name. dev_config bound but the device's name not (such a write
    was stored but never announced): written again."""
    early = FakeObject("vm1", "san/pool=fast", 1, configured=False)
    served = Served({"user_1/vm1": (1, "serial1")}, unbound={"user_1/vm1"})
    assert choose(FakeRoot([early]), Wanted([vdisk(1, "vm1")], adopted=served)) == {1: "user_1/vm1"}
    assert early.config == "san/pool=fast"
    half = FakeObject("vm1", "san/pool=fast;vdisk=1;serial=serial1", 1)
    writes: list[str] = []
    half.set_attribute = lambda name, value: writes.append(value)  # type: ignore[method-assign]
    choose(FakeRoot([half]), Wanted([vdisk(1, "vm1")], adopted=served))
    assert writes == ["san/pool=fast;vdisk=1;serial=serial1"]
