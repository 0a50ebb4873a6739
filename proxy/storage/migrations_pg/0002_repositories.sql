-- Domains and repositories live in the index: the config file seeds them at startup and the
-- admin API changes them at run time.
CREATE TABLE domains (
    name       TEXT COLLATE "C" PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE repositories (
    domain          TEXT COLLATE "C" NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
    name            TEXT COLLATE "C" NOT NULL,
    description     TEXT COLLATE "C" NOT NULL DEFAULT '',
    upstreams       TEXT COLLATE "C" NOT NULL DEFAULT '[]',   -- JSON array of names, in resolution order
    min_release_age DOUBLE PRECISION NOT NULL DEFAULT 0,      -- seconds an upstream version must have aged
    created_at      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (domain, name)
);

-- One row per package version a repository knows as its own: published (hosted) or copied in.
CREATE TABLE versions (
    domain      TEXT COLLATE "C" NOT NULL,
    repository  TEXT COLLATE "C" NOT NULL,
    format      TEXT COLLATE "C" NOT NULL,
    package     TEXT COLLATE "C" NOT NULL,
    version     TEXT COLLATE "C" NOT NULL,
    status      TEXT COLLATE "C" NOT NULL DEFAULT 'Published'
                CHECK (status IN ('Published', 'Unlisted', 'Archived', 'Disposed')),
    attributes  TEXT COLLATE "C" NOT NULL DEFAULT '{}',       -- JSON: the format's metadata fields
    created_at  DOUBLE PRECISION NOT NULL,
    updated_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (domain, repository, format, package, version)
);

-- Package origin controls: per package name or name prefix ("acme-*"), two switches.
CREATE TABLE origin_rules (
    domain     TEXT COLLATE "C" NOT NULL,
    repository TEXT COLLATE "C" NOT NULL,
    format     TEXT COLLATE "C" NOT NULL,
    pattern    TEXT COLLATE "C" NOT NULL,
    publish    TEXT COLLATE "C" NOT NULL CHECK (publish IN ('ALLOW', 'BLOCK')),
    upstream   TEXT COLLATE "C" NOT NULL CHECK (upstream IN ('ALLOW', 'BLOCK')),
    PRIMARY KEY (domain, repository, format, pattern)
);

-- package@version patterns that are never served (a known-malicious release, say).
CREATE TABLE quarantine (
    domain     TEXT COLLATE "C" NOT NULL,
    repository TEXT COLLATE "C" NOT NULL,
    format     TEXT COLLATE "C" NOT NULL,
    pattern    TEXT COLLATE "C" NOT NULL,
    reason     TEXT COLLATE "C" NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (domain, repository, format, pattern)
);
