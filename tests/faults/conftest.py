"""The fault suite's fixture; its hooks (report, xdist merge) live in ``tests/faults/plugin.py``,
loaded by ``tests/conftest.py`` so that the xdist controller, which collects nothing, has them."""

from __future__ import annotations

import pytest

from tests.faults.report import REPORT_KEY, GroupLedger


@pytest.fixture
def faults(request: pytest.FixtureRequest) -> GroupLedger:
    """The ledger of this test module's group (the module's ``GROUP`` names it)."""
    group: str = request.module.GROUP
    return request.config.stash[REPORT_KEY].ledger(group, request.node.nodeid)
