"""Fixtures and hooks of the fault-injection suite (see ``report.py`` for the ledger)."""

from __future__ import annotations

import pytest

from tests.faults.report import REPORT_KEY, FaultReport, GroupLedger


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REPORT_KEY] = FaultReport()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.failed:  # type: ignore[attr-defined]
        item.config.stash[REPORT_KEY].failed(item.nodeid)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    report = config.stash.get(REPORT_KEY, None)
    if report is None or not report.groups:
        return
    terminalreporter.section("fault-injection report")
    for line in report.table():
        terminalreporter.write_line(line)
    report.write_json()


@pytest.fixture
def faults(request: pytest.FixtureRequest) -> GroupLedger:
    """The ledger of this test module's group (the module's ``GROUP`` names it)."""
    group: str = request.module.GROUP
    return request.config.stash[REPORT_KEY].ledger(group, request.node.nodeid)
