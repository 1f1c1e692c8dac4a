-- The last row is cut off; the signed checkpoint still covers it.
-- expect: deleted 6
DELETE FROM audit_log WHERE seq = 6;
