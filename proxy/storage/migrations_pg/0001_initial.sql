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
-- On ``json``, not ``jsonb``: jsonb would rewrite what it keeps (numbers as NUMERIC, so 1e+300
-- came back as a 301-digit integer; keys sorted by length), where SQLite's json_patch keeps the
-- text of every value and the order of the keys (the target's, then the patch's new ones).
CREATE FUNCTION json_merge_patch(target json, patch json) RETURNS json
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    merged json;
BEGIN
    IF patch IS NULL OR json_typeof(patch) <> 'object' THEN
        RETURN patch;
    END IF;
    IF target IS NULL OR json_typeof(target) <> 'object' THEN
        target := '{}';
    END IF;
    SELECT json_object_agg(key, value ORDER BY source, ord) INTO merged FROM (
        -- The target's keys, in order: patched where the patch names them, gone where it says null.
        SELECT t.key, coalesce(json_merge_patch(t.value, p.value), t.value) AS value, 0 AS source, t.ord
        FROM json_each(target) WITH ORDINALITY AS t (key, value, ord)
        LEFT JOIN json_each(patch) AS p (key, value) ON p.key = t.key
        WHERE p.key IS NULL OR json_typeof(p.value) <> 'null'
        UNION ALL
        -- The patch's new keys, after them (their objects stripped of nulls, as RFC 7396 says).
        SELECT p.key, json_merge_patch(NULL, p.value), 1, p.ord
        FROM json_each(patch) WITH ORDINALITY AS p (key, value, ord)
        WHERE json_typeof(p.value) <> 'null'
          AND NOT EXISTS (SELECT 1 FROM json_each(target) AS t (key, value) WHERE t.key = p.key)
    ) AS merged_rows;
    RETURN coalesce(merged, '{}');
END $$;
CREATE FUNCTION json_patch(target text, patch text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT json_merge_patch(target::json, patch::json)::text $$;
