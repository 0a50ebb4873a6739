-- Access policies: which principals may read, publish, delete, administer, per domain
-- (repository '') or per repository. A domain with grants restricts tokens to what they give.
CREATE TABLE grants (
    domain      TEXT COLLATE "C" NOT NULL,
    repository  TEXT COLLATE "C" NOT NULL DEFAULT '',
    principal   TEXT COLLATE "C" NOT NULL,
    permissions TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (domain, repository, principal)
);
