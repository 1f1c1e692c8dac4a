# Aegis default policy: least privilege at the agent -> tool boundary.
#
# Entry point: data.aegis.authz.decision, an object with OPA-Envoy's keys plus
# `decision` (allow | deny | sanitize | approval_needed) and `reason`.
# Tool catalogue, thresholds and allowlists live in data.aegis (policies/aegis/data.json),
# with the route catalogue (data.aegis.routes) from which Aegis names the tool of a request
# that Envoy's route labels do not name. input.tool never comes from what the agent says.
# The checks run in a fixed order; the first that fails decides.
package aegis.authz

import rego.v1

tool := data.aegis.tools[input.tool.name]

action := tool.actions[input.tool.action]

scope_granted if action.scope in input.agent.scopes

# MCP session plumbing (initialize, tools/list, ...) needs no scope.
scope_granted if action.public == true

# Content from untrusted external sources (a web page, a GitHub issue, an email) may steer
# the agent; it must not trigger anything that changes state.
untrusted_mutation if {
	input.context.trust_level == "untrusted_external"
	action.mutating
}

url_host(url) := host if {
	parts := regex.find_all_string_submatch_n(`^https?://([^/:?#@]+)(:[0-9]+)?([/?#].*)?$`, url, 1)
	host := lower(parts[0][1])
}

egress_allowed if url_host(input.tool.arguments.url) in data.aegis.egress.allowed_hosts

egress_blocked if {
	tool.fetches_urls
	not egress_allowed
}

payment_needs_approval if {
	input.tool.name == "payments"
	input.tool.action in {"create", "refund"}
	input.tool.arguments.amount > data.aegis.payments.approval_threshold
}

# An amount the policy cannot read (missing, another key such as "Amount", not a number)
# may still be one the tool reads: ask.
payment_needs_approval if {
	input.tool.name == "payments"
	input.tool.action in {"create", "refund"}
	not is_number(input.tool.arguments.amount)
}

# Credentials the agent would hand to an external tool: header names and query parameters.
leaked_headers contains name if {
	tool.external
	some name in data.aegis.credentials.headers
	input.attributes.request.http.headers[name]
}

leaked_query_parameters contains name if {
	tool.external
	some name in data.aegis.credentials.query_parameters
	input.parsed_query[name]
}

needs_sanitizing if count(leaked_headers) + count(leaked_query_parameters) > 0

deny(reason) := {"allowed": false, "decision": "deny", "reason": reason, "http_status": 403}

# A body Envoy cut short may hide the real tool call: refuse to guess.
# A request on no route the platform configured (Envoy's route labels, data.aegis.routes)
# calls no known tool.
decision := deny("body_truncated") if {
	input.truncated_body == true
} else := deny("unknown_route") if {
	input.tool.source == "none"
} else := deny("unknown_tool") if {
	not tool
} else := deny("unknown_action") if {
	not action
} else := deny("missing_scope") if {
	not scope_granted
} else := deny("untrusted_content_mutation") if {
	untrusted_mutation
} else := deny("egress_not_allowed") if {
	egress_blocked
} else := {
	"allowed": false,
	"decision": "approval_needed",
	"reason": "payment_above_threshold",
	"http_status": 403,
} if {
	payment_needs_approval
} else := {
	"allowed": true,
	"decision": "sanitize",
	"reason": "credentials_stripped",
	"request_headers_to_remove": sort([h | some h in leaked_headers]),
	"query_parameters_to_remove": sort([q | some q in leaked_query_parameters]),
} if {
	needs_sanitizing
} else := {"allowed": true, "decision": "allow", "reason": "scope_granted"}
