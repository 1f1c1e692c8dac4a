-- Row 4's salt is replaced: every field commitment, and so its hash, changes.
-- expect: modified 4
UPDATE audit_log SET salt = zeroblob(32) WHERE seq = 4;
