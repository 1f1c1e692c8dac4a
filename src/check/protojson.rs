//! The CheckRequest attributes as OPA-Envoy sees them: Go's `protojson` encoding
//! (lowerCamelCase names, default values omitted, int64 as strings, bytes as base64,
//! timestamps as RFC 3339), so `input.attributes…` paths in OPA-Envoy policies resolve the
//! same here. Also the JSON ↔ `google.protobuf.Struct` conversions for dynamic metadata.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use envoy_types::pb::envoy::config::core::v3::{Address, Metadata, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer};
use envoy_types::pb::google::protobuf::{
    ListValue, Struct, Timestamp, Value as PbValue, value::Kind,
};
use regorus::Value as RValue;
use serde_json::{Map, Value};

/// A regorus object under construction; empty strings are omitted, as protojson omits
/// default values.
#[derive(Default)]
pub(crate) struct Obj(BTreeMap<RValue, RValue>);

impl Obj {
    pub(crate) fn put(&mut self, key: &str, value: RValue) -> &mut Self {
        self.0.insert(RValue::from(key), value);
        self
    }

    pub(crate) fn put_str(&mut self, key: &str, value: &str) -> &mut Self {
        if !value.is_empty() {
            self.put(key, RValue::from(value));
        }
        self
    }

    pub(crate) fn build(self) -> RValue {
        RValue::from(self.0)
    }
}

/// A string map as a regorus object.
pub(crate) fn string_map(m: &HashMap<String, String>) -> RValue {
    RValue::from(
        m.iter()
            .map(|(k, v)| (RValue::from(k.as_str()), RValue::from(v.as_str())))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// `input.attributes`.
pub fn attributes(a: &AttributeContext) -> RValue {
    let mut m = Obj::default();
    if let Some(p) = &a.source {
        m.put("source", peer(p));
    }
    if let Some(p) = &a.destination {
        m.put("destination", peer(p));
    }
    if let Some(r) = &a.request {
        let mut req = Obj::default();
        if let Some(t) = &r.time {
            req.put("time", RValue::from(rfc3339(t)));
        }
        if let Some(h) = &r.http {
            req.put("http", http(h));
        }
        m.put("request", req.build());
    }
    if !a.context_extensions.is_empty() {
        m.put("contextExtensions", string_map(&a.context_extensions));
    }
    if let Some(md) = &a.metadata_context {
        m.put("metadataContext", metadata(md));
    }
    if let Some(md) = &a.route_metadata_context {
        m.put("routeMetadataContext", metadata(md));
    }
    if let Some(tls) = a.tls_session.as_ref().filter(|t| !t.sni.is_empty()) {
        let mut t = Obj::default();
        t.put_str("sni", &tls.sni);
        m.put("tlsSession", t.build());
    }
    m.build()
}

fn peer(p: &Peer) -> RValue {
    let mut m = Obj::default();
    if let Some(a) = &p.address {
        m.put("address", address(a));
    }
    m.put_str("service", &p.service);
    if !p.labels.is_empty() {
        m.put("labels", string_map(&p.labels));
    }
    m.put_str("principal", &p.principal)
        .put_str("certificate", &p.certificate);
    m.build()
}

fn address(a: &Address) -> RValue {
    let mut outer = Obj::default();
    match &a.address {
        Some(address::Address::SocketAddress(s)) => {
            let mut m = Obj::default();
            m.put_str("address", &s.address);
            match &s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) if *p != 0 => {
                    m.put("portValue", RValue::from(*p));
                }
                Some(socket_address::PortSpecifier::NamedPort(n)) => {
                    m.put_str("namedPort", n);
                }
                _ => {}
            }
            outer.put("socketAddress", m.build());
        }
        Some(address::Address::Pipe(p)) => {
            let mut m = Obj::default();
            m.put_str("path", &p.path);
            outer.put("pipe", m.build());
        }
        Some(address::Address::EnvoyInternalAddress(_)) => {
            outer.put("envoyInternalAddress", Obj::default().build());
        }
        None => {}
    }
    outer.build()
}

fn http(h: &HttpRequest) -> RValue {
    let b64 = |bytes: &[u8]| RValue::from(base64::engine::general_purpose::STANDARD.encode(bytes));
    let mut m = Obj::default();
    m.put_str("id", &h.id).put_str("method", &h.method);
    if !h.headers.is_empty() {
        m.put("headers", string_map(&h.headers));
    }
    if let Some(map) = &h.header_map {
        let list: Vec<RValue> = map
            .headers
            .iter()
            .map(|hv| {
                let mut e = Obj::default();
                e.put_str("key", &hv.key).put_str("value", &hv.value);
                if !hv.raw_value.is_empty() {
                    e.put("rawValue", b64(&hv.raw_value));
                }
                e.build()
            })
            .collect();
        let mut hm = Obj::default();
        hm.put("headers", RValue::from(list));
        m.put("headerMap", hm.build());
    }
    m.put_str("path", &h.path)
        .put_str("host", &h.host)
        .put_str("scheme", &h.scheme)
        .put_str("query", &h.query)
        .put_str("fragment", &h.fragment);
    if h.size != 0 {
        m.put("size", RValue::from(h.size.to_string()));
    }
    m.put_str("protocol", &h.protocol).put_str("body", &h.body);
    if !h.raw_body.is_empty() {
        m.put("rawBody", b64(&h.raw_body));
    }
    m.build()
}

fn metadata(md: &Metadata) -> RValue {
    let mut m = Obj::default();
    if !md.filter_metadata.is_empty() {
        let fm: BTreeMap<RValue, RValue> = md
            .filter_metadata
            .iter()
            .map(|(k, s)| (RValue::from(k.as_str()), json_to_rego(&struct_to_json(s))))
            .collect();
        m.put("filterMetadata", RValue::from(fm));
    }
    m.build()
}

/// JSON → regorus value by direct recursion (several times cheaper than going through
/// serde's deserializer). Depth is bounded by serde_json's parser (128 levels).
pub fn json_to_rego(v: &Value) -> RValue {
    match v {
        Value::Null => RValue::Null,
        Value::Bool(b) => RValue::from(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                RValue::from(i)
            } else if let Some(u) = n.as_u64() {
                RValue::from(u)
            } else {
                RValue::from(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => RValue::from(s.as_str()),
        Value::Array(a) => RValue::from(a.iter().map(json_to_rego).collect::<Vec<_>>()),
        Value::Object(o) => map_to_rego(o),
    }
}

/// A JSON object → regorus object.
pub fn map_to_rego(o: &Map<String, Value>) -> RValue {
    RValue::from(
        o.iter()
            .map(|(k, v)| (RValue::from(k.as_str()), json_to_rego(v)))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// `google.protobuf.Struct` → JSON object.
pub fn struct_to_json(s: &Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), pb_value_to_json(v)))
            .collect(),
    )
}

fn pb_value_to_json(v: &PbValue) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(pb_value_to_json).collect()),
    }
}

/// JSON object → `google.protobuf.Struct`.
pub fn json_to_struct(m: &Map<String, Value>) -> Struct {
    Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_pb_value(v)))
            .collect(),
    }
}

fn json_to_pb_value(v: &Value) -> PbValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_pb_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    PbValue { kind: Some(kind) }
}

/// A protobuf Timestamp as RFC 3339 in UTC, protojson's way (see [`crate::time::rfc3339`]).
pub fn rfc3339(t: &Timestamp) -> String {
    crate::time::rfc3339(t.seconds, t.nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_like_protojson() {
        assert_eq!(
            rfc3339(&Timestamp {
                seconds: 0,
                nanos: 0
            }),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(&Timestamp {
                seconds: 1_763_779_200,
                nanos: 5_000_000
            }),
            "2025-11-22T02:40:00.005Z"
        );
        assert_eq!(
            rfc3339(&Timestamp {
                seconds: 951_782_400,
                nanos: 1
            }),
            "2000-02-29T00:00:00.000000001Z"
        );
    }
}
