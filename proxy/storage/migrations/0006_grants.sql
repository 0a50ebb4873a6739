-- Access policies: which principals may read, publish, delete, administer, per domain
-- (repository '') or per repository. A domain with grants restricts tokens to what they give.
CREATE TABLE grants (
    domain      TEXT NOT NULL,
    repository  TEXT NOT NULL DEFAULT '',
    principal   TEXT NOT NULL,
    permissions TEXT NOT NULL,
    PRIMARY KEY (domain, repository, principal)
) WITHOUT ROWID;
