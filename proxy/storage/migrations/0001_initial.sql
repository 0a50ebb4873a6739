-- Assets: one file of one package version in one repository, mapped to a blob by digest.
-- The row is written only after its blob is complete, fsynced, verified and renamed into place.
CREATE TABLE assets (
    domain        TEXT    NOT NULL,
    repository    TEXT    NOT NULL,
    format        TEXT    NOT NULL,
    package       TEXT    NOT NULL,
    filename      TEXT    NOT NULL,
    version       TEXT,
    digest        TEXT    NOT NULL,
    size          INTEGER NOT NULL,
    content_type  TEXT    NOT NULL,
    origin_url    TEXT,
    upstream      TEXT,
    hosted        INTEGER NOT NULL DEFAULT 0,
    fetched_at    REAL    NOT NULL,
    last_accessed REAL    NOT NULL,
    PRIMARY KEY (domain, repository, format, package, filename)
) WITHOUT ROWID;
CREATE INDEX assets_by_digest ON assets (digest);

-- Metadata documents as the upstream sent them, with validators for revalidation.
CREATE TABLE documents (
    upstream      TEXT    NOT NULL,
    doc_key       TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    body          BLOB    NOT NULL,
    content_type  TEXT    NOT NULL,
    etag          TEXT,
    last_modified TEXT,
    serial        INTEGER,
    fetched_at    REAL    NOT NULL,
    expires_at    REAL    NOT NULL,
    PRIMARY KEY (upstream, doc_key)
) WITHOUT ROWID;

-- An upstream's 404, remembered briefly so that misses do not hammer it. Failures never land here.
CREATE TABLE negative_cache (
    upstream   TEXT NOT NULL,
    doc_key    TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (upstream, doc_key)
) WITHOUT ROWID;
