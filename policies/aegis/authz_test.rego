# Unit tests for the default policy; run with `aegis policy test` (rules named test_*).
package aegis.authz_test

import rego.v1

import data.aegis.authz

agent(scopes) := {"id": "billing-bot", "tenant": "acme", "scopes": scopes}

call(name, act, args, scopes) := {
	"attributes": {"request": {"http": {"method": "POST", "path": "/mcp", "headers": {}}}},
	"parsed_query": {},
	"agent": agent(scopes),
	"tool": {"name": name, "action": act, "arguments": args},
	"context": {"trust_level": "internal"},
}

test_scope_allows_read if {
	d := authz.decision with input as call("invoices", "read", {}, ["invoices:read"])
	d.decision == "allow"
	d.allowed == true
}

test_missing_scope_denied if {
	d := authz.decision with input as call("invoices", "create", {}, ["invoices:read"])
	d.decision == "deny"
	d.reason == "missing_scope"
}

test_unknown_route_denied if {
	inp := object.union(call("", "", {}, ["invoices:read"]), {"tool": {"source": "none"}})
	d := authz.decision with input as inp
	d.reason == "unknown_route"
}

test_unknown_tool_denied if {
	d := authz.decision with input as call("shell", "exec", {}, ["invoices:read"])
	d.reason == "unknown_tool"
}

test_unknown_action_denied if {
	d := authz.decision with input as call("invoices", "delete_all", {}, ["invoices:write"])
	d.reason == "unknown_action"
}

test_small_payment_allowed if {
	d := authz.decision with input as call("payments", "create", {"amount": 250}, ["payments:create"])
	d.decision == "allow"
}

test_large_payment_needs_approval if {
	d := authz.decision with input as call("payments", "create", {"amount": 5000}, ["payments:create"])
	d.decision == "approval_needed"
	d.allowed == false
}

test_payment_without_a_readable_amount_needs_approval if {
	every args in [{}, {"Amount": 5000}, {"amount": "5000"}] {
		d := authz.decision with input as call("payments", "create", args, ["payments:create"])
		d.decision == "approval_needed"
	}
}

test_threshold_itself_is_allowed if {
	d := authz.decision with input as call("payments", "create", {"amount": 1000}, ["payments:create"])
	d.decision == "allow"
}

test_untrusted_content_cannot_mutate if {
	inp := object.union(call("github", "create_comment", {}, ["github:write"]), {"context": {"trust_level": "untrusted_external"}})
	d := authz.decision with input as inp
	d.reason == "untrusted_content_mutation"
}

test_untrusted_content_may_read if {
	inp := object.union(call("github", "read_issue", {}, ["github:read"]), {"context": {"trust_level": "untrusted_external"}})
	d := authz.decision with input as inp
	d.decision == "allow"
}

test_egress_allowlisted_host if {
	d := authz.decision with input as call("web_fetch", "get", {"url": "https://api.github.com/repos/x"}, ["web:fetch"])
	d.decision == "allow"
}

test_egress_other_host_denied if {
	d := authz.decision with input as call("web_fetch", "get", {"url": "https://evil.example.net/x"}, ["web:fetch"])
	d.reason == "egress_not_allowed"
}

test_egress_userinfo_trick_denied if {
	d := authz.decision with input as call("web_fetch", "get", {"url": "https://api.github.com@evil.example.net/"}, ["web:fetch"])
	d.reason == "egress_not_allowed"
}

test_egress_without_url_denied if {
	d := authz.decision with input as call("web_fetch", "get", {}, ["web:fetch"])
	d.reason == "egress_not_allowed"
}

test_credentials_stripped_for_external_tool if {
	base := call("github", "read_issue", {}, ["github:read"])
	inp := object.union(base, {
		"attributes": {"request": {"http": {"headers": {"authorization": "Bearer s3cret", "accept": "*/*"}}}},
		"parsed_query": {"access_token": ["abc"], "page": ["2"]},
	})
	d := authz.decision with input as inp
	d.decision == "sanitize"
	d.allowed == true
	d.request_headers_to_remove == ["authorization"]
	d.query_parameters_to_remove == ["access_token"]
}

test_internal_tool_keeps_headers if {
	base := call("invoices", "read", {}, ["invoices:read"])
	inp := object.union(base, {"attributes": {"request": {"http": {"headers": {"authorization": "Bearer x"}}}}})
	d := authz.decision with input as inp
	d.decision == "allow"
}

test_truncated_body_denied if {
	inp := object.union(call("invoices", "read", {}, ["invoices:read"]), {"truncated_body": true})
	d := authz.decision with input as inp
	d.reason == "body_truncated"
}

test_mcp_session_methods_need_no_scope if {
	d := authz.decision with input as call("mcp", "tools/list", {}, [])
	d.decision == "allow"
}

test_mcp_unknown_method_denied if {
	d := authz.decision with input as call("mcp", "sampling/createMessage", {}, [])
	d.reason == "unknown_action"
}
