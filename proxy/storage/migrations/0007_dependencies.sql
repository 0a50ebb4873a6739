-- Declared dependencies of package versions, read from the format's own metadata inside the
-- stored file that carries them (a wheel's METADATA, an npm tarball's package.json, a .pom, a
-- .nuspec). Keyed by that file's digest: the same bytes always declare the same dependencies,
-- so a version copied, promoted or cached in several repositories is read once.
CREATE TABLE dependency_sources (
    digest    TEXT PRIMARY KEY,
    format    TEXT NOT NULL,
    parsed_at REAL NOT NULL,
    error     TEXT NOT NULL DEFAULT ''     -- why nothing could be read ('' when it was)
) WITHOUT ROWID;

CREATE TABLE dependencies (
    digest    TEXT    NOT NULL,
    seq       INTEGER NOT NULL,            -- declaration order
    package   TEXT    NOT NULL,            -- canonical name in the format
    range     TEXT    NOT NULL,            -- as declared; '' when any version will do
    kind      TEXT    NOT NULL,            -- npm: dependencies/optionalDependencies/peerDependencies;
                                           -- Maven: the scope, or 'parent'; PyPI, NuGet: 'runtime'
    extras    TEXT    NOT NULL DEFAULT '', -- PyPI: the extras asked of the dependency
    condition TEXT    NOT NULL DEFAULT '', -- PyPI: the PEP 508 marker; NuGet: the target framework;
                                           -- Maven: 'optional'
    PRIMARY KEY (digest, seq)
) WITHOUT ROWID;
CREATE INDEX dependencies_by_package ON dependencies (package);
