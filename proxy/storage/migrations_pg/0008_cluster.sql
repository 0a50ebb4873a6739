-- Leases: one holder at a time for work that must run once for every process sharing the index
-- (gc and verify, an upstream credential's renewal). A lease lapses at ``until``, so a holder
-- that died frees it without anyone's help.
CREATE TABLE leases (
    name   TEXT COLLATE "C" PRIMARY KEY,
    holder TEXT COLLATE "C" NOT NULL,
    until  DOUBLE PRECISION NOT NULL
);

-- Upstream credentials renewed by one process for all: the token sealed with the server's
-- encryption key (storage/crypto.py), never in the clear.
CREATE TABLE shared_credentials (
    upstream   TEXT COLLATE "C" PRIMARY KEY,
    sealed     BYTEA NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    renewed_at DOUBLE PRECISION NOT NULL,
    renewed_by TEXT COLLATE "C" NOT NULL
);

-- The cluster's change counter (PostgreSQL only: one machine's workers share a memory-mapped
-- counter instead, storage/generation.py). Every commit other nodes must see increments it in
-- the same transaction and announces the new value with NOTIFY proxy_changes.
CREATE TABLE cluster_changes (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    generation BIGINT NOT NULL
);
INSERT INTO cluster_changes (id, generation) VALUES (1, 0);
