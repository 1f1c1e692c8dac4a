-- The same cut tail, checked without the witness: the shorter log is consistent and the
-- verifier cannot tell (the limit the witness removes).
-- expect: intact 4
DELETE FROM audit_log WHERE seq > 4;
DELETE FROM audit_checkpoint WHERE last_seq > 4;
