//! Signed bundles, in OPA's format: `.signatures.json` holds `{"signatures": ["<JWS>"]}`,
//! one compact JWS (here `{"alg":"EdDSA","kid":…}`) whose payload lists every other file
//! of the bundle with its SHA-256: `{"files":[{"name","hash","algorithm"}…],"keyid":…}`.
//!
//! Hashes follow OPA's rule (`bundle/hash.go`, `bundle/verify.go`): structured documents
//! (`data.json`, `data.yaml`, `.manifest`, `.signatures.json` by base name) are hashed over
//! their canonical JSON form (parsed; object keys sorted; compact; numbers as written;
//! strings as Go's `encoding/json` writes them without HTML escaping); every other file
//! over its raw bytes.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use super::{BundleError, BundleFiles};
use crate::keys::Signer;

/// The signatures file, at the bundle root.
pub const SIGNATURES_FILE: &str = ".signatures.json";

const ALGORITHM: &str = "SHA-256";

/// Whether OPA hashes `path` over its canonical JSON form.
fn is_structured(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    matches!(
        name,
        "data.json" | "data.yaml" | ".manifest" | ".signatures.json"
    )
}

/// The hex SHA-256 of a bundle file as OPA computes it.
pub fn file_hash(path: &str, bytes: &[u8]) -> Result<String, String> {
    let digest = if is_structured(path) {
        let name = path.rsplit('/').next().unwrap_or(path);
        let json = if name == "data.yaml" {
            // OPA converts YAML to JSON before hashing.
            let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
            let value = regorus::Value::from_yaml_str(text).map_err(|e| e.to_string())?;
            value.to_json_str().map_err(|e| e.to_string())?.into_bytes()
        } else {
            bytes.to_vec()
        };
        Sha256::digest(canonical_json(&json)?)
    } else {
        Sha256::digest(bytes)
    };
    Ok(crate::hex(&digest))
}

/// A JSON value that keeps numbers as written (OPA decodes with `UseNumber`).
enum Json {
    Lit(&'static str),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(BTreeMap<String, Json>),
}

/// The canonical form OPA hashes: keys sorted (byte order, the last of duplicates wins),
/// no whitespace, numbers verbatim, strings escaped as Go's encoder does.
pub fn canonical_json(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
        text,
    };
    let value = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing characters at byte {}", p.i));
    }
    let mut out = Vec::with_capacity(bytes.len());
    write_json(&value, &mut out);
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    text: &'a str,
}

const MAX_DEPTH: usize = 512;

impl Parser<'_> {
    fn ws(&mut self) {
        while matches!(self.s.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn err(&self, what: &str) -> String {
        format!("invalid JSON at byte {}: {what}", self.i)
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deep"));
        }
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut map = BTreeMap::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(map));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return Err(self.err("expected a key"));
                    }
                    let key = self.string()?;
                    self.ws();
                    if self.s.get(self.i) != Some(&b':') {
                        return Err(self.err("expected ':'"));
                    }
                    self.i += 1;
                    let v = self.value(depth + 1)?;
                    map.insert(key, v);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(map));
                        }
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(self.err("expected ',' or ']'")),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.err("expected a value")),
        }
    }

    fn literal(&mut self, lit: &'static str) -> Result<Json, String> {
        let rest = self.s.get(self.i..).unwrap_or_default();
        if rest.starts_with(lit.as_bytes()) {
            self.i += lit.len();
            Ok(Json::Lit(lit))
        } else {
            Err(self.err("expected a literal"))
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        let digits = |p: &mut Self| {
            let from = p.i;
            while matches!(p.s.get(p.i), Some(b'0'..=b'9')) {
                p.i += 1;
            }
            p.i - from
        };
        if self.s.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.s.get(int_start) == Some(&b'0')) {
            return Err(self.err("malformed number"));
        }
        if self.s.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return Err(self.err("malformed number"));
            }
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(self.err("malformed number"));
            }
        }
        Ok(Json::Num(self.text[start..self.i].to_owned()))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self
            .text
            .get(self.i..self.i + 4)
            .ok_or_else(|| self.err("short \\u escape"))?;
        let v = u32::from_str_radix(h, 16).map_err(|_| self.err("bad \\u escape"))?;
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // the opening quote
        let mut out = String::new();
        loop {
            let start = self.i;
            while let Some(&c) = self.s.get(self.i) {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.i += 1;
            }
            out.push_str(&self.text[start..self.i]);
            match self.s.get(self.i) {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = *self.s.get(self.i).ok_or_else(|| self.err("bad escape"))?;
                    self.i += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let ch = if (0xD800..0xDC00).contains(&hi)
                                && self.s.get(self.i) == Some(&b'\\')
                                && self.s.get(self.i + 1) == Some(&b'u')
                            {
                                let save = self.i;
                                self.i += 2;
                                let lo = self.hex4()?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                                } else {
                                    self.i = save;
                                    None
                                }
                            } else {
                                char::from_u32(hi)
                            };
                            // Go decodes a lone surrogate to U+FFFD.
                            out.push(ch.unwrap_or('\u{fffd}'));
                        }
                        _ => return Err(self.err("bad escape")),
                    }
                }
                _ => return Err(self.err("unterminated string")),
            }
        }
    }
}

fn write_json(v: &Json, out: &mut Vec<u8>) {
    match v {
        Json::Lit(l) => out.extend_from_slice(l.as_bytes()),
        Json::Num(n) => out.extend_from_slice(n.as_bytes()),
        Json::Str(s) => write_string(s, out),
        Json::Arr(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(item, out);
            }
            out.push(b']');
        }
        Json::Obj(map) => {
            out.push(b'{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_json(item, out);
            }
            out.push(b'}');
        }
    }
}

/// A string as Go's `encoding/json` encodes it with `SetEscapeHTML(false)`.
fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// `.signatures.json` for `files` (every file but a signatures file), signed by `signer`
/// with `kid` in the JWS header and the payload.
pub fn sign(files: &[(String, Vec<u8>)], signer: &Signer, kid: &str) -> Result<Vec<u8>, String> {
    let mut listed = Vec::new();
    for (path, bytes) in files {
        if path == SIGNATURES_FILE {
            continue;
        }
        let hash = file_hash(path, bytes).map_err(|e| format!("{path}: {e}"))?;
        listed.push(serde_json::json!({"name": path, "hash": hash, "algorithm": ALGORITHM}));
    }
    let header = serde_json::json!({"alg": "EdDSA", "kid": kid});
    let payload = serde_json::json!({"files": listed, "keyid": kid});
    let signing_input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(payload.to_string())
    );
    let sig = signer.sign(signing_input.as_bytes());
    let jws = format!("{signing_input}.{}", B64.encode(sig));
    let doc = serde_json::json!({ "signatures": [jws] });
    let mut out = serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?;
    out.push(b'\n');
    Ok(out)
}

#[derive(serde::Deserialize)]
struct SignaturesDoc {
    signatures: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Payload {
    files: Vec<FileInfo>,
}

#[derive(serde::Deserialize)]
struct FileInfo {
    name: String,
    hash: String,
    algorithm: String,
}

/// Verifies `.signatures.json`: one JWS, EdDSA, signed by one of `keys`, whose file list
/// matches the bundle's files exactly (none missing, none extra, every hash equal).
pub fn verify(files: &BundleFiles, keys: &[VerifyingKey]) -> Result<(), BundleError> {
    let refuse = |m: String| BundleError::Signature(m);
    let doc = files
        .files
        .iter()
        .find(|(p, _)| p == SIGNATURES_FILE)
        .map(|(_, b)| b)
        .ok_or_else(|| refuse("bundle is not signed (no .signatures.json)".into()))?;
    let doc: SignaturesDoc = serde_json::from_slice(doc)
        .map_err(|e| refuse(format!(".signatures.json is malformed: {e}")))?;
    let [jws] = doc.signatures.as_slice() else {
        return Err(refuse(format!(
            ".signatures.json holds {} signatures; exactly one is expected",
            doc.signatures.len()
        )));
    };
    let mut parts = jws.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse("the signature is not a compact JWS".into()));
    };
    let header: serde_json::Value = B64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| refuse("the signature's JWS header is malformed".into()))?;
    match header.get("alg").and_then(serde_json::Value::as_str) {
        Some("EdDSA") => {}
        Some(other) => {
            return Err(refuse(format!(
                "signature algorithm {other:?} is refused (only EdDSA is accepted)"
            )));
        }
        None => return Err(refuse("the signature's JWS header has no alg".into())),
    }
    let sig = B64
        .decode(s)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| refuse("signature does not verify with the verification key".into()))?;
    let signing_input = &jws[..h.len() + 1 + p.len()];
    if !keys
        .iter()
        .any(|k| k.verify_strict(signing_input.as_bytes(), &sig).is_ok())
    {
        return Err(refuse(
            "signature does not verify with the verification key".into(),
        ));
    }
    let payload: Payload = B64
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| refuse("the signature's payload is malformed".into()))?;
    let mut listed: BTreeMap<String, FileInfo> = BTreeMap::new();
    for f in payload.files {
        let name = f.name.trim_start_matches('/').to_owned();
        if listed.contains_key(&name) {
            return Err(refuse(format!(
                "file {name} is listed twice in the signature"
            )));
        }
        listed.insert(name, f);
    }
    for (path, bytes) in &files.files {
        if path == SIGNATURES_FILE {
            continue;
        }
        let info = listed
            .remove(path)
            .ok_or_else(|| refuse(format!("file {path} is not covered by the signature")))?;
        if info.algorithm != ALGORITHM {
            return Err(refuse(format!(
                "file {path}: hash algorithm {:?} is not {ALGORITHM}",
                info.algorithm
            )));
        }
        let hash = file_hash(path, bytes).map_err(|e| refuse(format!("file {path}: {e}")))?;
        if !hash.eq_ignore_ascii_case(&info.hash) {
            return Err(refuse(format!("file {path}: hash mismatch")));
        }
    }
    if let Some(name) = listed.keys().next() {
        return Err(refuse(format!(
            "file {name} listed in the signature is missing"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_keeps_numbers_and_escapes_like_go() {
        let raw = br#" { "b" : [1.50, 2e3, -0, {"z":null,"a":true}], "a":"x<&>\u00e9\u2028\"\\\/\b\u0001", "a":"last" }"#;
        let c = canonical_json(raw).expect("valid");
        assert_eq!(
            String::from_utf8(c).expect("utf8"),
            r#"{"a":"last","b":[1.50,2e3,-0,{"a":true,"z":null}]}"#
        );
        let s = canonical_json(br#"["x<&>\u00e9\u2028\"\\\/\b\u0001\ud83d\ude00"]"#).expect("ok");
        assert_eq!(
            String::from_utf8(s).expect("utf8"),
            "[\"x<&>\u{e9}\\u2028\\\"\\\\/\\b\\u0001\u{1f600}\"]"
        );
        for bad in [
            &b"{"[..],
            b"[1,]",
            b"01",
            b"{\"a\" 1}",
            b"[] x",
            b"\"\x01\"",
        ] {
            assert!(
                canonical_json(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn json_files_hash_over_their_canonical_form_and_others_over_raw_bytes() {
        let pretty = b"{\n  \"b\": 1,\n  \"a\": {\"y\": [true, \"s\"]}\n}\n";
        let expected = crate::hex(&Sha256::digest(br#"{"a":{"y":[true,"s"]},"b":1}"#));
        assert_eq!(file_hash("x/data.json", pretty).expect("hash"), expected);
        assert_eq!(file_hash(".manifest", pretty).expect("hash"), expected);
        let rego = b"package p\n\nallow := true\n";
        assert_eq!(
            file_hash("p/policy.rego", rego).expect("hash"),
            crate::hex(&Sha256::digest(rego))
        );
        // A JSON file that is not a structured document by OPA's name rule: raw bytes.
        assert_eq!(
            file_hash("other.json", pretty).expect("hash"),
            crate::hex(&Sha256::digest(pretty))
        );
        assert!(file_hash("data.json", b"{nope").is_err());
    }
}
