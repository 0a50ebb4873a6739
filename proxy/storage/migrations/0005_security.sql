-- Access tokens: only a SHA-256 of each (256-bit random) secret is kept.
CREATE TABLE tokens (
    id           TEXT PRIMARY KEY,
    secret_hash  TEXT NOT NULL UNIQUE,
    principal    TEXT NOT NULL,
    domain       TEXT,             -- NULL: every domain (bootstrap-level admin)
    repository   TEXT,             -- NULL: every repository of the domain
    permissions  TEXT NOT NULL,    -- JSON list of read, publish, delete, admin
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    revoked_at   REAL,
    last_used_at REAL,
    issued_by    TEXT NOT NULL DEFAULT ''
);

-- Who may read a repository without a token.
ALTER TABLE repositories ADD COLUMN anonymous_read INTEGER NOT NULL DEFAULT 0;

-- The audit trail: append-only, each record carrying the hash of the one before it.
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL NOT NULL,
    principal  TEXT NOT NULL,
    token_id   TEXT NOT NULL,
    client     TEXT NOT NULL,
    action     TEXT NOT NULL,
    domain     TEXT NOT NULL,
    repository TEXT NOT NULL,
    format     TEXT NOT NULL,
    package    TEXT NOT NULL,
    version    TEXT NOT NULL,
    digest     TEXT NOT NULL,
    result     TEXT NOT NULL,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_at ON audit (at);
CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
