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

use crate::policy::reads::{self, Reads};

/// A regorus object under construction, holding only the keys its [`Reads`] names;
/// empty strings are omitted, as protojson omits default values.
pub(crate) struct Obj<'r> {
    map: BTreeMap<RValue, RValue>,
    reads: &'r Reads,
}

impl Default for Obj<'static> {
    fn default() -> Self {
        Self::reading(&reads::ALL)
    }
}

impl<'r> Obj<'r> {
    /// An object of which only what `reads` names is built.
    pub(crate) fn reading(reads: &'r Reads) -> Self {
        Self {
            map: BTreeMap::new(),
            reads,
        }
    }

    /// `key` set to what `value` makes of what is read under it, if anything is.
    pub(crate) fn put_with(
        &mut self,
        key: &str,
        value: impl FnOnce(&'r Reads) -> RValue,
    ) -> &mut Self {
        if let Some(under) = self.reads.get(key) {
            self.map.insert(RValue::from(key), value(under));
        }
        self
    }

    pub(crate) fn put(&mut self, key: &str, value: RValue) -> &mut Self {
        self.put_with(key, |_| value)
    }

    pub(crate) fn put_str(&mut self, key: &str, value: &str) -> &mut Self {
        if !value.is_empty() {
            self.put_with(key, |_| RValue::from(value));
        }
        self
    }

    pub(crate) fn build(self) -> RValue {
        RValue::from(self.map)
    }
}

/// A string map as a regorus object, with only the keys `reads` names.
pub(crate) fn string_map(m: &HashMap<String, String>, reads: &Reads) -> RValue {
    let pair = |(k, v): (&String, &String)| (RValue::from(k.as_str()), RValue::from(v.as_str()));
    RValue::from(match reads {
        Reads::All => m.iter().map(pair).collect::<BTreeMap<_, _>>(),
        Reads::Keys(keys) => keys
            .keys()
            .filter_map(|k| m.get_key_value(k))
            .map(pair)
            .collect(),
    })
}

/// `input.attributes`, with only what `reads` names.
pub fn attributes(a: &AttributeContext, reads: &Reads) -> RValue {
    let mut m = Obj::reading(reads);
    if let Some(p) = &a.source {
        m.put_with("source", |r| peer(p, r));
    }
    if let Some(p) = &a.destination {
        m.put_with("destination", |r| peer(p, r));
    }
    if let Some(r) = &a.request {
        m.put_with("request", |reads| {
            let mut req = Obj::reading(reads);
            if let Some(t) = &r.time {
                req.put_with("time", |_| RValue::from(rfc3339(t)));
            }
            if let Some(h) = &r.http {
                req.put_with("http", |r| http(h, r));
            }
            req.build()
        });
    }
    if !a.context_extensions.is_empty() {
        m.put_with("contextExtensions", |r| {
            string_map(&a.context_extensions, r)
        });
    }
    if let Some(md) = &a.metadata_context {
        m.put_with("metadataContext", |r| metadata(md, r));
    }
    if let Some(md) = &a.route_metadata_context {
        m.put_with("routeMetadataContext", |r| metadata(md, r));
    }
    if let Some(tls) = a.tls_session.as_ref().filter(|t| !t.sni.is_empty()) {
        m.put_with("tlsSession", |r| {
            let mut t = Obj::reading(r);
            t.put_str("sni", &tls.sni);
            t.build()
        });
    }
    m.build()
}

fn peer(p: &Peer, reads: &Reads) -> RValue {
    let mut m = Obj::reading(reads);
    if let Some(a) = &p.address {
        m.put_with("address", |r| address(a, r));
    }
    m.put_str("service", &p.service);
    if !p.labels.is_empty() {
        m.put_with("labels", |r| string_map(&p.labels, r));
    }
    m.put_str("principal", &p.principal)
        .put_str("certificate", &p.certificate);
    m.build()
}

fn address(a: &Address, reads: &Reads) -> RValue {
    let mut outer = Obj::reading(reads);
    match &a.address {
        Some(address::Address::SocketAddress(s)) => {
            outer.put_with("socketAddress", |r| {
                let mut m = Obj::reading(r);
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
                m.build()
            });
        }
        Some(address::Address::Pipe(p)) => {
            outer.put_with("pipe", |r| {
                let mut m = Obj::reading(r);
                m.put_str("path", &p.path);
                m.build()
            });
        }
        Some(address::Address::EnvoyInternalAddress(_)) => {
            outer.put_with("envoyInternalAddress", |_| Obj::default().build());
        }
        None => {}
    }
    outer.build()
}

fn http(h: &HttpRequest, reads: &Reads) -> RValue {
    let b64 = |bytes: &[u8]| RValue::from(base64::engine::general_purpose::STANDARD.encode(bytes));
    let mut m = Obj::reading(reads);
    m.put_str("id", &h.id).put_str("method", &h.method);
    if !h.headers.is_empty() {
        m.put_with("headers", |r| string_map(&h.headers, r));
    }
    if let Some(map) = &h.header_map {
        // An array under it: built whole.
        m.put_with("headerMap", |_| {
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
            hm.build()
        });
    }
    m.put_str("path", &h.path)
        .put_str("host", &h.host)
        .put_str("scheme", &h.scheme)
        .put_str("query", &h.query)
        .put_str("fragment", &h.fragment);
    if h.size != 0 {
        m.put_with("size", |_| RValue::from(h.size.to_string()));
    }
    m.put_str("protocol", &h.protocol).put_str("body", &h.body);
    if !h.raw_body.is_empty() {
        m.put_with("rawBody", |_| b64(&h.raw_body));
    }
    m.build()
}

fn metadata(md: &Metadata, reads: &Reads) -> RValue {
    let mut m = Obj::reading(reads);
    if !md.filter_metadata.is_empty() {
        m.put_with("filterMetadata", |reads| {
            let mut fm = Obj::reading(reads);
            for (k, s) in &md.filter_metadata {
                fm.put_with(k, |r| json_to_rego_within(&struct_to_json(s), r));
            }
            fm.build()
        });
    }
    m.build()
}

/// JSON → regorus value by direct recursion (several times cheaper than going through
/// serde's deserializer). Depth is bounded by serde_json's parser (128 levels).
pub fn json_to_rego(v: &Value) -> RValue {
    json_to_rego_within(v, &reads::ALL)
}

/// [`json_to_rego`] keeping, of each object, only the keys `reads` names (arrays whole).
pub fn json_to_rego_within(v: &Value, reads: &Reads) -> RValue {
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
        Value::Object(o) => map_to_rego(o, reads),
    }
}

/// A JSON object → regorus object, with only the keys `reads` names.
pub fn map_to_rego(o: &Map<String, Value>, reads: &Reads) -> RValue {
    let pair = |(k, v): (&String, &Value), r: &Reads| {
        (RValue::from(k.as_str()), json_to_rego_within(v, r))
    };
    RValue::from(match reads {
        Reads::All => o
            .iter()
            .map(|kv| pair(kv, &reads::ALL))
            .collect::<BTreeMap<_, _>>(),
        Reads::Keys(keys) => keys
            .iter()
            .filter_map(|(k, r)| o.get_key_value(k).map(|kv| pair(kv, r)))
            .collect(),
    })
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
