-- A/B tests: a candidate version of a model serves a share of sessions beside production.
CREATE TABLE ab_tests (
    id                 TEXT PRIMARY KEY,
    model_name         TEXT NOT NULL,
    production_version BIGINT NOT NULL,
    candidate_version  BIGINT NOT NULL,
    share              DOUBLE PRECISION NOT NULL,
    -- 1: the server promotes or rolls back on its own once the verdict is significant.
    auto_decide        BIGINT NOT NULL DEFAULT 1,
    status             TEXT NOT NULL,
    started_ms         BIGINT NOT NULL,
    ended_ms           BIGINT,
    verdict            TEXT
);

-- At most one running test per model.
CREATE UNIQUE INDEX ab_tests_one_running ON ab_tests (model_name) WHERE status = 'running';
