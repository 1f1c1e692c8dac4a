-- The checkpoint that signs row 4 has its signature replaced.
-- expect: bad_signature 4
UPDATE audit_checkpoint SET signature = zeroblob(64) WHERE last_seq = 4;
