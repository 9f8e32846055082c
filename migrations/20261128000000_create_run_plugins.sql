-- Lineage: which plugins (name, version, kind, SHA-256, API version) each run called, in order.
CREATE TABLE run_plugins (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    position BIGINT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    api_version TEXT NOT NULL,
    PRIMARY KEY (run_id, position)
);

CREATE INDEX run_plugins_by_plugin ON run_plugins (name, sha256);
