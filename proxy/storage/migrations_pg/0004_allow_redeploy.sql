-- Whether a repository lets a release file be deployed again with other bytes (Maven's
-- "allow redeploy"); off by default, as published files are immutable.
ALTER TABLE repositories ADD COLUMN allow_redeploy BIGINT NOT NULL DEFAULT 0;
