-- A row is appended after the last one, linked to it, but no key signed it.
-- expect: inserted 7
INSERT INTO audit_log (seq, time_ns, http_status, kind, decision_id, tenant, agent, session, run_id, tool, action, resource, decision, reason, policy_revision, trust_level, approval_id, actor, trace_id, span_id, key_id, prev_hash, hash, salt)
  SELECT 7, time_ns, http_status, kind, 'forged', tenant, agent, session, run_id, tool, action, resource, 'allow', reason, policy_revision, trust_level, approval_id, actor, trace_id, span_id, key_id, hash, hash, salt
  FROM audit_log WHERE seq = 6;
