-- An insider turns a deny into an allow.
-- expect: modified 3
UPDATE audit_log SET decision = 'allow' WHERE seq = 3;
