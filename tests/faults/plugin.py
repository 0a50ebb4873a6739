"""Hooks of the fault-injection suite: the per-group report printed at the end of the run.

Under pytest-xdist each worker keeps its own ledger and hands it to the controller when it
finishes (``workeroutput``); the controller merges them and prints the one table.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.faults.report import REPORT_KEY, FaultReport


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REPORT_KEY] = FaultReport()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.failed:  # type: ignore[attr-defined]
        item.config.stash[REPORT_KEY].failed(item.nodeid)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # an xdist worker: the controller prints
        output["fault_report"] = json.dumps(session.config.stash[REPORT_KEY].to_dict())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    data = getattr(node, "workeroutput", {}).get("fault_report")
    if data:
        node.config.stash[REPORT_KEY].merge(json.loads(data))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    report = config.stash.get(REPORT_KEY, None)
    if report is None or not report.groups:
        return
    terminalreporter.section("fault-injection report")
    for line in report.table():
        terminalreporter.write_line(line)
    report.write_json()
