-- A journal as the release before schema 1 (multipart sessions) wrote it: Journal.open,
-- two files accepted, one verified and committed, one uploading when the daemon died.
BEGIN TRANSACTION;
CREATE TABLE files (
    path        TEXT PRIMARY KEY,   -- relative to the run directory
    rank        INTEGER NOT NULL,
    name        TEXT NOT NULL,      -- relative to the rank directory
    object      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    checkpoint  INTEGER NOT NULL,   -- 1 when it belongs to a checkpoint (else an artifact)
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    digest      TEXT,
    committed   INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    accepted_at REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    updated_at  REAL NOT NULL
);
INSERT INTO "files" VALUES('checkpoints/ep1.pt',0,'checkpoints/ep1.pt','exp/rank_0/checkpoints/ep1.pt',12582912,1700000000000000000,1,'uploading',1,NULL,0,NULL,1.79603554661737704282e+09,1.79603554661804795267e+09,NULL,1.79603554661804795267e+09);
INSERT INTO "files" VALUES('checkpoints/ep0.pt',0,'checkpoints/ep0.pt','exp/rank_0/checkpoints/ep0.pt',1000,1690000000000000000,1,'done',1,'sha256:0000000000000000000000000000000000000000000000000000000000000000',1,NULL,1.79603554661770820621e+09,1.79603554661781954771e+09,1.79603554661790299415e+09,1.7960355466179859638e+09);
CREATE INDEX files_state ON files(state);
CREATE INDEX files_rank_name ON files(rank, name);
COMMIT;
