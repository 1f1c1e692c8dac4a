-- Rows 5 and 6 are cut off together with the checkpoints that sign them: no key needed,
-- and the log alone still verifies; the witness saw checkpoints up to seq 6.
-- witness: yes
-- expect: deleted 5
DELETE FROM audit_log WHERE seq > 4;
DELETE FROM audit_checkpoint WHERE last_seq > 4;
