-- The log is intact, but the verifier is given another Aegis's public key.
-- key: foreign
-- expect: bad_signature 1
SELECT 1;
