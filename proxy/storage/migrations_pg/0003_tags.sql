-- Named pointers to versions of a package published in a repository (npm's dist-tags).
CREATE TABLE package_tags (
    domain     TEXT COLLATE "C" NOT NULL,
    repository TEXT COLLATE "C" NOT NULL,
    format     TEXT COLLATE "C" NOT NULL,
    package    TEXT COLLATE "C" NOT NULL,
    tag        TEXT COLLATE "C" NOT NULL,
    version    TEXT COLLATE "C" NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (domain, repository, format, package, tag)
);
