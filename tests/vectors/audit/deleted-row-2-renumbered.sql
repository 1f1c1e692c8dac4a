-- Row 2 is deleted and the rows after it renumbered to hide the gap.
-- expect: deleted 2
DELETE FROM audit_log WHERE seq = 2;
UPDATE audit_log SET seq = seq + 1000 WHERE seq > 2;
UPDATE audit_log SET seq = seq - 1001 WHERE seq > 1000;
