-- Row 3's salt is removed, as if it had been written before salts (format 1).
-- expect: modified 3
UPDATE audit_log SET salt = NULL WHERE seq = 3;
