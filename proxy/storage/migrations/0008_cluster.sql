-- Leases: one holder at a time for work that must run once for every process sharing the index
-- (gc and verify, an upstream credential's renewal). A lease lapses at ``until``, so a holder
-- that died frees it without anyone's help.
CREATE TABLE leases (
    name   TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until  REAL NOT NULL
) WITHOUT ROWID;

-- Upstream credentials renewed by one process for all: the token sealed with the server's
-- encryption key (storage/crypto.py), never in the clear.
CREATE TABLE shared_credentials (
    upstream   TEXT PRIMARY KEY,
    sealed     BLOB NOT NULL,
    expires_at REAL NOT NULL,
    renewed_at REAL NOT NULL,
    renewed_by TEXT NOT NULL
) WITHOUT ROWID;
