-- The experiment store, version 1. Portable SQL: it runs on SQLite and PostgreSQL.
-- Times are milliseconds since the Unix epoch; JSON documents are TEXT.

CREATE TABLE runs (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    status        TEXT NOT NULL,          -- queued | running | succeeded | failed | interrupted
    config        TEXT NOT NULL,          -- the resolved experiment (TOML)
    summary       TEXT,                   -- summary.json once the run ends
    run_dir       TEXT NOT NULL,
    model_source  TEXT NOT NULL,
    method        TEXT NOT NULL,
    dataset_hash  TEXT,
    device        TEXT NOT NULL,
    git_revision  TEXT,
    host          TEXT NOT NULL,
    pid           BIGINT NOT NULL,
    started_ms    BIGINT NOT NULL,
    finished_ms   BIGINT,
    steps         BIGINT NOT NULL DEFAULT 0,
    total_steps   BIGINT NOT NULL DEFAULT 0,
    accuracy      DOUBLE PRECISION,
    macro_f1      DOUBLE PRECISION,
    error         TEXT
);
CREATE INDEX runs_started ON runs (started_ms);
CREATE INDEX runs_status ON runs (status);

CREATE TABLE metrics (
    run_id   TEXT NOT NULL REFERENCES runs (id),
    key      TEXT NOT NULL,
    step     BIGINT NOT NULL,
    value    DOUBLE PRECISION NOT NULL,
    time_ms  BIGINT NOT NULL,
    PRIMARY KEY (run_id, key, step)
);

CREATE TABLE artifacts (
    run_id  TEXT NOT NULL REFERENCES runs (id),
    kind    TEXT NOT NULL,
    path    TEXT NOT NULL,
    sha256  TEXT NOT NULL,
    bytes   BIGINT NOT NULL,
    PRIMARY KEY (run_id, path)
);

CREATE TABLE models (
    name        TEXT NOT NULL,
    version     BIGINT NOT NULL,
    run_id      TEXT NOT NULL REFERENCES runs (id),
    path        TEXT NOT NULL,
    stage       TEXT NOT NULL,            -- candidate | production | archived
    promoted_ms BIGINT,                   -- when it last became production
    metrics     TEXT,
    created_ms  BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE predictions (
    id             TEXT PRIMARY KEY,
    model_name     TEXT NOT NULL,
    model_version  BIGINT NOT NULL,
    input          TEXT NOT NULL,
    output         TEXT NOT NULL,
    probabilities  TEXT NOT NULL,
    latency_ms     DOUBLE PRECISION NOT NULL,
    arm            TEXT,
    time_ms        BIGINT NOT NULL
);
CREATE INDEX predictions_model ON predictions (model_name, model_version);

CREATE TABLE feedback (
    id               TEXT PRIMARY KEY,
    prediction_id    TEXT NOT NULL REFERENCES predictions (id),
    rating           TEXT NOT NULL,       -- correct | wrong
    corrected_label  TEXT,
    comment          TEXT,
    author           TEXT,
    reviewed         BOOLEAN NOT NULL DEFAULT FALSE,
    time_ms          BIGINT NOT NULL
);
CREATE INDEX feedback_prediction ON feedback (prediction_id);

CREATE TABLE events (
    id       TEXT PRIMARY KEY,
    kind     TEXT NOT NULL,               -- register | promote | rollback | interrupted | ...
    subject  TEXT NOT NULL,
    detail   TEXT NOT NULL,
    actor    TEXT NOT NULL,
    time_ms  BIGINT NOT NULL
);
CREATE INDEX events_time ON events (time_ms);
