-- The tree head the checkpoint at seq 4 signs is replaced (its signature no longer covers it).
-- expect: bad_signature 4
UPDATE audit_checkpoint SET root = zeroblob(32) WHERE last_seq = 4;
