-- PostgreSQL's form of migrations/0001_initial.sql (same tables, same keys). Text compares by
-- byte (COLLATE "C") as in SQLite, so listings sort the same on both; REAL is DOUBLE PRECISION.
-- Assets: one file of one package version in one repository, mapped to a blob by digest.
-- The row is written only after its blob is complete, fsynced, verified and renamed into place.
CREATE TABLE assets (
    domain        TEXT COLLATE "C"    NOT NULL,
    repository    TEXT COLLATE "C"    NOT NULL,
    format        TEXT COLLATE "C"    NOT NULL,
    package       TEXT COLLATE "C"    NOT NULL,
    filename      TEXT COLLATE "C"    NOT NULL,
    version       TEXT COLLATE "C",
    digest        TEXT COLLATE "C"    NOT NULL,
    size          BIGINT NOT NULL,
    content_type  TEXT COLLATE "C"    NOT NULL,
    origin_url    TEXT COLLATE "C",
    upstream      TEXT COLLATE "C",
    hosted        BIGINT NOT NULL DEFAULT 0,
    fetched_at    DOUBLE PRECISION    NOT NULL,
    last_accessed DOUBLE PRECISION    NOT NULL,
    PRIMARY KEY (domain, repository, format, package, filename)
);
CREATE INDEX assets_by_digest ON assets (digest);

-- Metadata documents as the upstream sent them, with validators for revalidation.
CREATE TABLE documents (
    upstream      TEXT COLLATE "C"    NOT NULL,
    doc_key       TEXT COLLATE "C"    NOT NULL,
    url           TEXT COLLATE "C"    NOT NULL,
    body          BYTEA    NOT NULL,
    content_type  TEXT COLLATE "C"    NOT NULL,
    etag          TEXT COLLATE "C",
    last_modified TEXT COLLATE "C",
    serial        BIGINT,
    fetched_at    DOUBLE PRECISION    NOT NULL,
    expires_at    DOUBLE PRECISION    NOT NULL,
    PRIMARY KEY (upstream, doc_key)
);

-- An upstream's 404, remembered briefly so that misses do not hammer it. Failures never land here.
CREATE TABLE negative_cache (
    upstream   TEXT COLLATE "C" NOT NULL,
    doc_key    TEXT COLLATE "C" NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (upstream, doc_key)
);

-- SQLite's json_patch (RFC 7396 merge patch), so the catalog's queries read the same on both.
CREATE FUNCTION json_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    k text;
    v jsonb;
    merged jsonb;
BEGIN
    IF patch IS NULL OR jsonb_typeof(patch) <> 'object' THEN
        RETURN patch;
    END IF;
    IF target IS NULL OR jsonb_typeof(target) <> 'object' THEN
        merged := '{}'::jsonb;
    ELSE
        merged := target;
    END IF;
    FOR k, v IN SELECT * FROM jsonb_each(patch) LOOP
        IF v = 'null'::jsonb THEN
            merged := merged - k;
        ELSE
            merged := jsonb_set(merged, ARRAY[k], json_merge_patch(merged -> k, v));
        END IF;
    END LOOP;
    RETURN merged;
END $$;
CREATE FUNCTION json_patch(target text, patch text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT json_merge_patch(target::jsonb, patch::jsonb)::text $$;
