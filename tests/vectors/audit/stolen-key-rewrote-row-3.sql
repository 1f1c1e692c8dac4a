-- A thief of the audit key turns row 3's deny into an allow and signs the whole log again;
-- the witness saw the original rows 1..=3.
-- resign: yes
-- witness: yes
-- expect: modified 3
UPDATE audit_log SET decision = 'allow' WHERE seq = 3;
