-- Access tokens: only a SHA-256 of each (256-bit random) secret is kept.
CREATE TABLE tokens (
    id           TEXT COLLATE "C" PRIMARY KEY,
    secret_hash  TEXT COLLATE "C" NOT NULL UNIQUE,
    principal    TEXT COLLATE "C" NOT NULL,
    domain       TEXT COLLATE "C",             -- NULL: every domain (bootstrap-level admin)
    repository   TEXT COLLATE "C",             -- NULL: every repository of the domain
    permissions  TEXT COLLATE "C" NOT NULL,    -- JSON list of read, publish, delete, admin
    created_at   DOUBLE PRECISION NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL,
    revoked_at   DOUBLE PRECISION,
    last_used_at DOUBLE PRECISION,
    issued_by    TEXT COLLATE "C" NOT NULL DEFAULT ''
);

-- Who may read a repository without a token.
ALTER TABLE repositories ADD COLUMN anonymous_read BIGINT NOT NULL DEFAULT 0;

-- The audit trail: append-only, each record carrying the hash of the one before it.
CREATE TABLE audit (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         DOUBLE PRECISION NOT NULL,
    principal  TEXT COLLATE "C" NOT NULL,
    token_id   TEXT COLLATE "C" NOT NULL,
    client     TEXT COLLATE "C" NOT NULL,
    action     TEXT COLLATE "C" NOT NULL,
    domain     TEXT COLLATE "C" NOT NULL,
    repository TEXT COLLATE "C" NOT NULL,
    format     TEXT COLLATE "C" NOT NULL,
    package    TEXT COLLATE "C" NOT NULL,
    version    TEXT COLLATE "C" NOT NULL,
    digest     TEXT COLLATE "C" NOT NULL,
    result     TEXT COLLATE "C" NOT NULL,
    detail     TEXT COLLATE "C" NOT NULL,
    prev_hash  TEXT COLLATE "C" NOT NULL,
    hash       TEXT COLLATE "C" NOT NULL
);
CREATE INDEX audit_at ON audit (at);
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
FOR EACH ROW EXECUTE FUNCTION audit_append_only();
