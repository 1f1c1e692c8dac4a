-- A copy of row 3 is slipped in as row 4; the rows after it are renumbered.
-- expect: inserted 4
UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 4;
UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1004;
INSERT INTO audit_log (seq, time_ns, http_status, kind, decision_id, tenant, agent, session, run_id, tool, action, resource, decision, reason, policy_revision, trust_level, approval_id, actor, trace_id, span_id, key_id, prev_hash, hash, salt)
  SELECT 4, time_ns, http_status, kind, decision_id, tenant, agent, session, run_id, tool, action, resource, 'allow', reason, policy_revision, trust_level, approval_id, actor, trace_id, span_id, key_id, prev_hash, hash, salt
  FROM audit_log WHERE seq = 3;
