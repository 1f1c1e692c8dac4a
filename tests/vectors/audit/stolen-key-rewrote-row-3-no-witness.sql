-- The same rewrite by a thief of the audit key, checked without the witness: the log alone
-- is consistent, and the verifier cannot tell. This vector states the limit (see the
-- README's audit section); the one above is what the witness adds.
-- resign: yes
-- expect: intact
UPDATE audit_log SET decision = 'allow' WHERE seq = 3;
