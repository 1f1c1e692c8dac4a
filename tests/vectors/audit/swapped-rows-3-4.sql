-- Rows 3 and 4 trade places.
-- expect: reordered 3
UPDATE audit_log SET seq = -1 WHERE seq = 3;
UPDATE audit_log SET seq = 3 WHERE seq = 4;
UPDATE audit_log SET seq = 4 WHERE seq = -1;
