#!/usr/bin/env python3
"""Writes a test copy of Envoy's bootstrap (deploy/envoy.yaml) in which only addresses change.

Run by tests/common/envoy.rs with the test venv's python (PyYAML). The integration tests
must exercise the shipped file, so everything else -- filters, routes and their
typed_per_filter_config, tracing, ext_authz settings, HCM options -- is copied as it is:

  admin                    -> 127.0.0.1, port 0
  listener agent_outbound  -> 127.0.0.1, port 0 (the tests read the port from the admin API)
  cluster aegis            -> STATIC --aegis HOST:PORT
  cluster tools            -> STATIC --tools HOST:PORT, plain HTTP/1.1 (its TLS dropped)
  cluster otel-collector   -> STATIC --otlp HOST:PORT (no DNS)

Clusters and listeners are found by name; a missing one is an error.

--overrides takes a JSON object for the few tests that need a setting changed. Each value
is merged into its target (objects key by key, recursively; anything else replaces; null
removes the key):

  "ext_authz":         the ext_authz filter's typed_config,
                       e.g. {"ext_authz": {"grpc_service": {"timeout": "2s"}}}
  "hcm":               the listener's HttpConnectionManager typed_config
  "clusters": {NAME:}  the cluster NAME
  "without_ext_authz": true
                       Envoy alone: the ext_authz filter and its per-route settings
                       removed (the baseline of the latency benchmark)

Usage: envoy_test_config.py SOURCE DEST --aegis HOST:PORT --tools HOST:PORT
                            --otlp HOST:PORT [--overrides JSON]
"""

import argparse
import json
import sys

import yaml

LISTENER = "agent_outbound"
HCM = "envoy.filters.network.http_connection_manager"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Cluster fields that only mean something to a DNS-resolved (or custom) cluster type.
DNS_FIELDS = (
    "cluster_type",
    "dns_lookup_family",
    "dns_refresh_rate",
    "dns_failure_refresh_rate",
    "dns_jitter",
    "respect_dns_ttl",
    "dns_resolvers",
    "dns_resolution_config",
    "typed_dns_resolver_config",
    "use_tcp_for_dns_lookups",
)


def fail(message):
    sys.exit(f"envoy_test_config.py: {message}")


def host_port(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def named(items, name, what):
    """The one item of `items` called `name`."""
    found = [i for i in items or [] if isinstance(i, dict) and i.get("name") == name]
    if len(found) != 1:
        fail(f"expected one {what} named {name!r}, found {len(found)}")
    return found[0]


def point_at(socket_address, host, port):
    """Changes the address and port of a socket_address, keeping its other fields."""
    socket_address["address"] = host
    socket_address["port_value"] = port


def static_cluster(cluster, host, port):
    """Makes `cluster` a STATIC cluster with one endpoint, host:port."""
    cluster["type"] = "STATIC"
    for field in DNS_FIELDS:
        cluster.pop(field, None)
    assignment = cluster.setdefault("load_assignment", {})
    assignment["cluster_name"] = cluster["name"]
    assignment["endpoints"] = [
        {
            "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
            ]
        }
    ]


def plain_http1(cluster):
    """Drops the cluster's upstream TLS and makes it speak HTTP/1.1 (the test upstream's)."""
    cluster.pop("transport_socket", None)
    cluster.pop("transport_socket_matches", None)
    options = (cluster.get("typed_extension_protocol_options") or {}).get(HTTP_OPTIONS)
    if options is None:
        return  # no protocol options: Envoy's default, HTTP/1.1
    http1 = {}
    for selection in ("explicit_http_config", "auto_config", "use_downstream_protocol_config"):
        chosen = options.pop(selection, None) or {}
        http1 = chosen.get("http_protocol_options", http1)
    options["explicit_http_config"] = {"http_protocol_options": http1}


def merge(target, changes, where):
    """Merges `changes` into the dict `target` (null removes a key)."""
    if not isinstance(changes, dict):
        fail(f"override for {where} must be a JSON object, got {changes!r}")
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value, f"{where}.{key}")
        else:
            target[key] = value


def http_connection_managers(listener):
    hcms = [
        f["typed_config"]
        for chain in listener.get("filter_chains") or []
        for f in chain.get("filters") or []
        if f.get("name") == HCM
    ]
    if not hcms:
        fail(f"listener {LISTENER!r} has no {HCM}")
    return hcms


def ext_authz_filters(hcms):
    found = [f for hcm in hcms for f in hcm.get("http_filters") or [] if f.get("name") == EXT_AUTHZ]
    if not found:
        fail(f"listener {LISTENER!r} has no {EXT_AUTHZ} filter")
    return found


def rewrite(config, aegis, tools, otlp, overrides):
    admin = config.get("admin")
    if not isinstance(admin, dict):
        fail("no admin section")
    point_at(admin.setdefault("address", {}).setdefault("socket_address", {}), "127.0.0.1", 0)

    resources = config.get("static_resources") or fail("no static_resources")
    listener = named(resources.get("listeners"), LISTENER, "listener")
    point_at(listener["address"]["socket_address"], "127.0.0.1", 0)

    clusters = resources.get("clusters")
    static_cluster(named(clusters, "aegis", "cluster"), *aegis)
    tools_cluster = named(clusters, "tools", "cluster")
    static_cluster(tools_cluster, *tools)
    plain_http1(tools_cluster)
    static_cluster(named(clusters, "otel-collector", "cluster"), *otlp)

    hcms = http_connection_managers(listener)
    filters = ext_authz_filters(hcms)
    for target, changes in overrides.items():
        if target == "ext_authz":
            for f in filters:
                merge(f["typed_config"], changes, "ext_authz")
        elif target == "hcm":
            for hcm in hcms:
                merge(hcm, changes, "hcm")
        elif target == "without_ext_authz":
            if changes is True:
                for hcm in hcms:
                    hcm["http_filters"] = [
                        f for f in hcm.get("http_filters") or [] if f.get("name") != EXT_AUTHZ
                    ]
                    for vh in (hcm.get("route_config") or {}).get("virtual_hosts") or []:
                        for route in vh.get("routes") or []:
                            (route.get("typed_per_filter_config") or {}).pop(EXT_AUTHZ, None)
        elif target == "clusters":
            if not isinstance(changes, dict):
                fail("override 'clusters' must map cluster names to objects")
            for name, cluster_changes in changes.items():
                merge(named(clusters, name, "cluster"), cluster_changes, f"clusters.{name}")
        else:
            fail(f"unknown override target {target!r} (ext_authz, hcm, clusters, without_ext_authz)")
    return config


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--aegis", type=host_port, required=True)
    p.add_argument("--tools", type=host_port, required=True)
    p.add_argument("--otlp", type=host_port, required=True)
    p.add_argument("--overrides", type=json.loads, default={})
    a = p.parse_args()
    if not isinstance(a.overrides, dict):
        fail("--overrides must be a JSON object")
    with open(a.source, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config = rewrite(config, a.aegis, a.tools, a.otlp, a.overrides)
    with open(a.dest, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False, default_flow_style=False)


if __name__ == "__main__":
    main()
