"""libiscsi's conformance suite, iscsi-test-cu, against `san serve` and against the gateway of a two-process cluster
(`san controller` + `san gateway`): every suite of family ALL, one at a time, with --dataloss, both default
initiator names zoned as hosts. No test may fail; every skipped test must be listed, with its reason, in the README
(CUnit counts a skipped test as passed, so skips are read from the output)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SanServer, serving, serving_cluster

TARGET = "iqn.2003-01.org.san:conformance"
INITIATORS = ("iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test", "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2")
SUITES = [
    "CompareAndWrite",
    "ExtendedCopy",
    "GetLBAStatus",
    "Inquiry",
    "Mandatory",
    "ModeSense6",
    "NoMedia",
    "OrWrite",
    "Prefetch10",
    "Prefetch16",
    "PreventAllow",
    "PrinReadKeys",
    "PrinServiceactionRange",
    "PrinReportCapabilities",
    "ProutRegister",
    "ProutReserve",
    "ProutClear",
    "ProutPreempt",
    "Read6",
    "Read10",
    "Read12",
    "Read16",
    "ReadCapacity10",
    "ReadCapacity16",
    "ReadDefectData10",
    "ReadDefectData12",
    "ReadOnly",
    "ReceiveCopyResults",
    "ReportSupportedOpcodes",
    "Reserve6",
    "Sanitize",
    "StartStopUnit",
    "TestUnitReady",
    "Unmap",
    "Verify10",
    "Verify12",
    "Verify16",
    "Write10",
    "Write12",
    "Write16",
    "WriteAtomic16",
    "WriteSame10",
    "WriteSame16",
    "WriteVerify10",
    "WriteVerify12",
    "WriteVerify16",
    "iSCSIcmdsn",
    "iSCSIdatasn",
    "iSCSIResiduals",
    "iSCSITMF",
    "MultipathIO",
]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module", params=["serve", "cluster"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    base = tmp_path_factory.mktemp("conformance")
    started = serving(base, "--iqn", TARGET) if request.param == "serve" else serving_cluster(base, TARGET)
    with started as san:
        san.ok("pool", "create", "p", "--size", "2G")
        san.ok("vdisk", "create", "disk", "--pool", "p", "--size", "256M")
        san.ok("vdisk", "create", "ro", "--pool", "p", "--size", "16M")
        for index, iqn in enumerate(INITIATORS):
            san.ok("host", "create", f"libiscsi{index}", "--iqn", iqn)
            san.ok("zone", "add", f"libiscsi{index}", "disk", "--lun", "0")
            san.ok("zone", "add", f"libiscsi{index}", "ro", "--lun", "1", "--read-only")
        yield san


def skipped_tests(output: str) -> list[tuple[str, str]]:
    """(test, reason) of every [SKIPPED] line, the test being the last `Test: NAME ...` before it."""
    found: list[tuple[str, str]] = []
    current = ""
    for line in output.splitlines():
        test = re.search(r"Test: (\S+) \.\.\.", line)
        if test:
            current = test.group(1)
        skip = re.search(r"\[SKIPPED\] (.*)", line)
        if skip:
            found.append((current, skip.group(1).strip()))
    return found


def test_the_suite_list_is_the_installed_ones() -> None:
    listing = subprocess.run(["iscsi-test-cu", "--list"], capture_output=True, text=True, timeout=60, check=False)
    installed = re.findall(r"^ALL\.([A-Za-z0-9_]+)$", listing.stdout + listing.stderr, re.MULTILINE)
    assert installed == SUITES, "iscsi-test-cu has other suites than this test knows: update SUITES and the README"


@pytest.mark.parametrize("suite", SUITES)
def test_suite(server: SanServer, suite: str) -> None:
    lun = 1 if suite == "ReadOnly" else 0
    url = f"iscsi://127.0.0.1:{server.iscsi_port}/{TARGET}/{lun}"
    urls = [url, url] if suite == "MultipathIO" else [url]
    command = ["iscsi-test-cu", "--test", f"ALL.{suite}", "--dataloss", "-i", INITIATORS[0], "-I", INITIATORS[1], *urls]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    summary = re.search(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", output, re.MULTILINE)
    assert summary, output
    ran, failed = int(summary.group(2)), int(summary.group(4))
    assert ran > 0, output
    assert failed == 0, output
    readme = README.read_text()
    for test, reason in skipped_tests(output):
        assert f"{suite}.{test}" in readme, f"{suite}.{test} was skipped ({reason}) and is not listed in the README"
