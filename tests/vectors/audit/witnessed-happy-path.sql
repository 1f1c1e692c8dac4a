-- The untouched log, checked against its witness.
-- witness: yes
-- expect: intact
SELECT 1;
