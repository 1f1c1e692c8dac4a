//! The CheckRequest attributes as OPA-Envoy sees them: Go's `protojson` encoding
//! (lowerCamelCase names, default values omitted, int64 as strings, bytes as base64,
//! timestamps as RFC 3339), so `input.attributes…` paths in OPA-Envoy policies resolve the
//! same here. Also the JSON ↔ `google.protobuf.Struct` conversions for dynamic metadata.

use base64::Engine as _;
use envoy_types::pb::envoy::config::core::v3::{Address, Metadata, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer};
use envoy_types::pb::google::protobuf::{
    ListValue, Struct, Timestamp, Value as PbValue, value::Kind,
};
use serde_json::{Map, Value, json};

/// `input.attributes`.
pub fn attributes(a: &AttributeContext) -> Value {
    let mut m = Map::new();
    if let Some(p) = &a.source {
        m.insert("source".into(), peer(p));
    }
    if let Some(p) = &a.destination {
        m.insert("destination".into(), peer(p));
    }
    if let Some(r) = &a.request {
        let mut req = Map::new();
        if let Some(t) = &r.time {
            req.insert("time".into(), Value::String(rfc3339(t)));
        }
        if let Some(h) = &r.http {
            req.insert("http".into(), http(h));
        }
        m.insert("request".into(), Value::Object(req));
    }
    if !a.context_extensions.is_empty() {
        m.insert("contextExtensions".into(), json!(a.context_extensions));
    }
    if let Some(md) = &a.metadata_context {
        m.insert("metadataContext".into(), metadata(md));
    }
    if let Some(md) = &a.route_metadata_context {
        m.insert("routeMetadataContext".into(), metadata(md));
    }
    if let Some(tls) = &a.tls_session
        && !tls.sni.is_empty()
    {
        m.insert("tlsSession".into(), json!({ "sni": tls.sni }));
    }
    Value::Object(m)
}

fn put_str(m: &mut Map<String, Value>, k: &str, v: &str) {
    if !v.is_empty() {
        m.insert(k.into(), Value::String(v.to_owned()));
    }
}

fn peer(p: &Peer) -> Value {
    let mut m = Map::new();
    if let Some(a) = &p.address {
        m.insert("address".into(), address_json(a));
    }
    put_str(&mut m, "service", &p.service);
    if !p.labels.is_empty() {
        m.insert("labels".into(), json!(p.labels));
    }
    put_str(&mut m, "principal", &p.principal);
    put_str(&mut m, "certificate", &p.certificate);
    Value::Object(m)
}

fn address_json(a: &Address) -> Value {
    match &a.address {
        Some(address::Address::SocketAddress(s)) => {
            let mut m = Map::new();
            put_str(&mut m, "address", &s.address);
            match &s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) if *p != 0 => {
                    m.insert("portValue".into(), json!(p));
                }
                Some(socket_address::PortSpecifier::NamedPort(n)) => {
                    put_str(&mut m, "namedPort", n)
                }
                _ => {}
            }
            json!({ "socketAddress": m })
        }
        Some(address::Address::Pipe(p)) => json!({ "pipe": { "path": p.path } }),
        Some(address::Address::EnvoyInternalAddress(_)) => json!({ "envoyInternalAddress": {} }),
        None => json!({}),
    }
}

fn http(h: &HttpRequest) -> Value {
    let mut m = Map::new();
    put_str(&mut m, "id", &h.id);
    put_str(&mut m, "method", &h.method);
    if !h.headers.is_empty() {
        m.insert("headers".into(), json!(h.headers));
    }
    if let Some(map) = &h.header_map {
        let list: Vec<Value> = map
            .headers
            .iter()
            .map(|hv| {
                let mut e = Map::new();
                put_str(&mut e, "key", &hv.key);
                put_str(&mut e, "value", &hv.value);
                if !hv.raw_value.is_empty() {
                    e.insert(
                        "rawValue".into(),
                        Value::String(
                            base64::engine::general_purpose::STANDARD.encode(&hv.raw_value),
                        ),
                    );
                }
                Value::Object(e)
            })
            .collect();
        m.insert("headerMap".into(), json!({ "headers": list }));
    }
    put_str(&mut m, "path", &h.path);
    put_str(&mut m, "host", &h.host);
    put_str(&mut m, "scheme", &h.scheme);
    put_str(&mut m, "query", &h.query);
    put_str(&mut m, "fragment", &h.fragment);
    if h.size != 0 {
        m.insert("size".into(), Value::String(h.size.to_string()));
    }
    put_str(&mut m, "protocol", &h.protocol);
    put_str(&mut m, "body", &h.body);
    if !h.raw_body.is_empty() {
        m.insert(
            "rawBody".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(&h.raw_body)),
        );
    }
    Value::Object(m)
}

fn metadata(md: &Metadata) -> Value {
    let fm: Map<String, Value> = md
        .filter_metadata
        .iter()
        .map(|(k, s)| (k.clone(), struct_to_json(s)))
        .collect();
    if fm.is_empty() {
        json!({})
    } else {
        json!({ "filterMetadata": fm })
    }
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

/// RFC 3339 in UTC with protojson's fraction rule (0, 3, 6 or 9 digits).
pub fn rfc3339(t: &Timestamp) -> String {
    let days = t.seconds.div_euclid(86_400);
    let secs = t.seconds.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let nanos = t.nanos.clamp(0, 999_999_999);
    let frac = if nanos == 0 {
        String::new()
    } else if nanos % 1_000_000 == 0 {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{frac}Z")
}

/// Days since 1970-01-01 → (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
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
