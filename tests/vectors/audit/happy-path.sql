-- The untouched log: six rows, each committed (and checkpointed) on its own.
-- expect: intact
SELECT 1;
