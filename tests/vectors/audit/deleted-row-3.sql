-- Row 3 is deleted outright, leaving a gap in seq.
-- expect: deleted 3
DELETE FROM audit_log WHERE seq = 3;
