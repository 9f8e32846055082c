-- Per-model rules for A/B tests that decide on their own.
CREATE TABLE model_rules (
    model_name     TEXT PRIMARY KEY,
    -- Rated predictions each arm needs before a feedback verdict or the error-rate bound applies.
    min_rated      BIGINT NOT NULL,
    -- Roll back when the candidate's held-out accuracy (its registration metrics) is below
    -- production's minus this.
    heldout_delta  DOUBLE PRECISION,
    -- Roll back when the candidate arm's feedback-rated error rate is above this.
    max_error_rate DOUBLE PRECISION
);
