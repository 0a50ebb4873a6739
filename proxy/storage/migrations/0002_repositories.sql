-- Domains and repositories live in the index: the config file seeds them at startup and the
-- admin API changes them at run time.
CREATE TABLE domains (
    name       TEXT PRIMARY KEY,
    created_at REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE repositories (
    domain          TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    upstreams       TEXT NOT NULL DEFAULT '[]',   -- JSON array of names, in resolution order
    min_release_age REAL NOT NULL DEFAULT 0,      -- seconds an upstream version must have aged
    created_at      REAL NOT NULL,
    PRIMARY KEY (domain, name)
) WITHOUT ROWID;

-- One row per package version a repository knows as its own: published (hosted) or copied in.
CREATE TABLE versions (
    domain      TEXT NOT NULL,
    repository  TEXT NOT NULL,
    format      TEXT NOT NULL,
    package     TEXT NOT NULL,
    version     TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'Published'
                CHECK (status IN ('Published', 'Unlisted', 'Archived', 'Disposed')),
    attributes  TEXT NOT NULL DEFAULT '{}',       -- JSON: the format's metadata fields
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (domain, repository, format, package, version)
) WITHOUT ROWID;

-- Package origin controls: per package name or name prefix ("acme-*"), two switches.
CREATE TABLE origin_rules (
    domain     TEXT NOT NULL,
    repository TEXT NOT NULL,
    format     TEXT NOT NULL,
    pattern    TEXT NOT NULL,
    publish    TEXT NOT NULL CHECK (publish IN ('ALLOW', 'BLOCK')),
    upstream   TEXT NOT NULL CHECK (upstream IN ('ALLOW', 'BLOCK')),
    PRIMARY KEY (domain, repository, format, pattern)
) WITHOUT ROWID;

-- package@version patterns that are never served (a known-malicious release, say).
CREATE TABLE quarantine (
    domain     TEXT NOT NULL,
    repository TEXT NOT NULL,
    format     TEXT NOT NULL,
    pattern    TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (domain, repository, format, pattern)
) WITHOUT ROWID;
