"""CHAP brute force: failed logins back off per initiator name and per source address, a login in backoff is
refused without its secret being checked, and every accepted and refused login is logged with the peer address.

The original: 1,000 wrong secrets from one process took 3.1 s, and the log named the initiator but not its address."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from conftest import SanServer, serving
from rawiscsi import RawInitiator

from san.iscsi.guard import FIRST_DELAY, MAX_DELAY, LoginGuard

TARGET = "iqn.2003-01.org.san:guard"
VICTIM = "iqn.2024-01.org.example:victim"
SECRET = "the-right-secret-1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_after_the_free_failures_and_success_clears_it() -> None:
    clock = Clock()
    guard = LoginGuard(clock)
    for _ in range(3):
        assert guard.wait("iqn.a", "10.0.0.1") == 0
        guard.failed("iqn.a", "10.0.0.1")
    assert guard.wait("iqn.a", "10.0.0.1") == 0, "three failures are free"
    delays = []
    for _ in range(9):
        guard.failed("iqn.a", "10.0.0.1")
        delays.append(guard.wait("iqn.a", "10.0.0.1"))
        clock.now += delays[-1]
    assert delays[:3] == [FIRST_DELAY, 2 * FIRST_DELAY, 4 * FIRST_DELAY] and max(delays) == MAX_DELAY
    guard.succeeded("iqn.a", "10.0.0.1")
    assert guard.wait("iqn.a", "10.0.0.1") == 0
    for _ in range(4):
        guard.failed("iqn.c", "10.0.0.3")
    assert guard.wait("iqn.c", "10.0.0.3") > 0
    clock.now += 601
    assert guard.wait("iqn.c", "10.0.0.3") == 0, "ten quiet minutes forget the failures"


def test_failing_under_a_hosts_name_elsewhere_does_not_lock_it_out() -> None:
    clock = Clock()
    guard = LoginGuard(clock)
    for _ in range(8):
        guard.failed("iqn.victim", "10.0.0.66")
    assert guard.wait("iqn.victim", "10.0.0.66") > 0, "the attacker is held back"
    assert guard.wait("iqn.victim", "10.0.0.5") == 0, "the host at its own address is not"


def test_one_address_trying_many_names_is_held_back_too() -> None:
    clock = Clock()
    guard = LoginGuard(clock)
    for n in range(10):
        guard.failed(f"iqn.name{n}", "10.0.0.9")
    assert guard.wait("iqn.fresh", "10.0.0.9") == 0, "an address (NAT) has ten free failures"
    guard.failed("iqn.name10", "10.0.0.9")
    assert guard.wait("iqn.fresh", "10.0.0.9") == FIRST_DELAY


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    with serving(tmp_path_factory.mktemp("guard"), "--iqn", TARGET) as san:
        san.ok("pool", "create", "p", "--size", "64M")
        san.ok("vdisk", "create", "v", "--pool", "p", "--size", "16M")
        san.ok(
            "host", "create", "victim", "--iqn", VICTIM, "--chap-user", "victim", "--chap-secret-file", "-", input=SECRET + "\n"
        )
        san.ok("zone", "add", "victim", "v")
        yield san


def attempt(server: SanServer, secret: str) -> bool:
    initiator = RawInitiator(server.iscsi_port, VICTIM)
    try:
        initiator.login_chap(TARGET, "victim", secret)
        return True
    except ConnectionError:
        return False
    finally:
        initiator.close()


def test_guessing_a_secret_is_slowed_to_a_crawl(server: SanServer) -> None:
    started = time.monotonic()
    results = [attempt(server, f"wrong-guess-{n:04d}") for n in range(30)]
    assert not any(results)
    burst = time.monotonic() - started
    assert not attempt(server, SECRET), "in backoff even the right secret is refused, unchecked: guessing learns nothing"
    log = server.log_text()
    checked = log.count("CHAP authentication failed")
    # Three free failures, one more that starts the backoff, and one more each time a delay (1 s, 2 s, ...) ran out
    # while the 30 attempts went on: a handful, not 30.
    assert 4 <= checked <= 7, f"{checked} of 30 guesses were checked"
    assert "too many failed logins" in log and "127.0.0.1" in log
    time.sleep(FIRST_DELAY * 2 ** (checked - 4) + 0.5)
    assert attempt(server, SECRET), "once the delay has passed the right secret gets in"
    assert re.search(r"login from 'iqn.2024-01.org.example:victim' at 127\.0\.0\.1 accepted", server.log_text())
    assert re.search(r"login from 'iqn.2024-01.org.example:victim' at 127\.0\.0\.1 refused", log)
    assert burst < 30, "the refused attempts themselves are answered at once"


def test_a_host_without_chap_is_warned_about(server: SanServer) -> None:
    result = server.run("host", "create", "open", "--iqn", "iqn.2024-01.org.example:open")
    assert result.returncode == 0
    assert "warning" in result.stderr and "no CHAP" in result.stderr
    assert "host open (iqn.2024-01.org.example:open) has no CHAP" in server.log_text()
    server.ok("host", "delete", "open")
