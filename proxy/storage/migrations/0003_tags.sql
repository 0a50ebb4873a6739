-- Named pointers to versions of a package published in a repository (npm's dist-tags).
CREATE TABLE package_tags (
    domain     TEXT NOT NULL,
    repository TEXT NOT NULL,
    format     TEXT NOT NULL,
    package    TEXT NOT NULL,
    tag        TEXT NOT NULL,
    version    TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (domain, repository, format, package, tag)
) WITHOUT ROWID;
