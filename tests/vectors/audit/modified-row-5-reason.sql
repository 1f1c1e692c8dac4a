-- The reason of row 5 is rewritten.
-- expect: modified 5
UPDATE audit_log SET reason = 'nothing to see' WHERE seq = 5;
