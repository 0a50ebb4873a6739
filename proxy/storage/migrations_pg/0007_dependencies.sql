-- Declared dependencies of package versions, read from the format's own metadata inside the
-- stored file that carries them (a wheel's METADATA, an npm tarball's package.json, a .pom, a
-- .nuspec). Keyed by that file's digest: the same bytes always declare the same dependencies,
-- so a version copied, promoted or cached in several repositories is read once.
CREATE TABLE dependency_sources (
    digest    TEXT COLLATE "C" PRIMARY KEY,
    format    TEXT COLLATE "C" NOT NULL,
    parsed_at DOUBLE PRECISION NOT NULL,
    error     TEXT COLLATE "C" NOT NULL DEFAULT ''     -- why nothing could be read ('' when it was)
);

CREATE TABLE dependencies (
    digest    TEXT COLLATE "C"    NOT NULL,
    seq       BIGINT NOT NULL,            -- declaration order
    package   TEXT COLLATE "C"    NOT NULL,            -- canonical name in the format
    range     TEXT COLLATE "C"    NOT NULL,            -- as declared; '' when any version will do
    kind      TEXT COLLATE "C"    NOT NULL,            -- npm: dependencies/optionalDependencies/peerDependencies;
                                           -- Maven: the scope, or 'parent'; PyPI, NuGet: 'runtime'
    extras    TEXT COLLATE "C"    NOT NULL DEFAULT '', -- PyPI: the extras asked of the dependency
    condition TEXT COLLATE "C"    NOT NULL DEFAULT '', -- PyPI: the PEP 508 marker; NuGet: the target framework;
                                           -- Maven: 'optional'
    PRIMARY KEY (digest, seq)
);
CREATE INDEX dependencies_by_package ON dependencies (package);
