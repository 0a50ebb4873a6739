"""Access policies: per domain and per repository, which principals may do what.

A token says what its holder asked for; a policy says what a principal may have there. Where a
domain has no grants, tokens alone decide (the default). Once a domain has any grant, a token's
permission counts only if a grant gives it to the token's principal (or to ``*``) on the domain
as a whole or on the repository in question, so an administrator can take ``publish`` away from
a principal in one repository without reissuing its tokens. The bootstrap administrator is not
subject to policies. Grants are kept in memory and reloaded when the index changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.storage.index import Index


@dataclass(frozen=True, slots=True)
class Grant:
    principal: str
    permissions: frozenset[str]
    repository: str = ""  # '' : the whole domain


class Policies:
    """See the module docstring."""

    def __init__(self, index: Index) -> None:
        self._index = index
        self._by_domain: dict[str, list[Grant]] = {}

    async def load(self) -> None:
        by_domain: dict[str, list[Grant]] = {}
        async with self._index.db.execute(
            "SELECT domain, repository, principal, permissions FROM grants"
        ) as cur:
            for domain, repository, principal, permissions in await cur.fetchall():
                by_domain.setdefault(str(domain), []).append(
                    Grant(str(principal), frozenset(json.loads(str(permissions))), str(repository))
                )
        self._by_domain = by_domain

    def grants(self, domain: str) -> list[Grant]:
        return list(self._by_domain.get(domain, []))

    def permits(self, principal: str, domain: str | None, repository: str | None, permission: str) -> bool:
        if domain is None:
            return True  # proxy-wide actions are not governed by a domain's policy
        grants = self._by_domain.get(domain)
        if not grants:
            return True
        for grant in grants:
            if grant.principal not in (principal, "*"):
                continue
            if grant.repository and grant.repository != repository:
                continue
            if permission in grant.permissions or "admin" in grant.permissions:
                return True
        return False

    async def replace(self, domain: str, grants: Iterable[Grant]) -> None:
        """The domain's whole policy, replaced in one transaction."""
        async with self._index.transaction():
            await self._index.db.execute("DELETE FROM grants WHERE domain=?", (domain,))
            for g in grants:
                await self._index.db.execute(
                    "INSERT INTO grants (domain, repository, principal, permissions) VALUES (?,?,?,?)",
                    (domain, g.repository, g.principal, json.dumps(sorted(g.permissions))),
                )
        await self.load()


def describe(grants: Iterable[Grant]) -> list[Mapping[str, object]]:
    return [
        {"principal": g.principal, "repository": g.repository or None, "permissions": sorted(g.permissions)}
        for g in grants
    ]
