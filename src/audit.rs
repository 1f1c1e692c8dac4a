//! The audit log: one row per Check (and, later, per control action), hash-chained and
//! covered by Ed25519-signed checkpoints, in SQLite.
//!
//! **Signing by checkpoint, not per row.** Every commit (one group-commit transaction,
//! holding every row of a batch of concurrent Checks) appends a checkpoint signing the
//! sequence number and chain hash of its last row, in the same transaction. A Check
//! answers only after its transaction commits, so every row whose Check got a response is
//! covered by a signature, exactly as with per-row signatures, while a saturated server
//! pays one Ed25519 signature (~15 µs) per batch instead of per row. The cost is
//! granularity: if an attacker rewrites the chain *and* recomputes every hash after the
//! change, the verifier can name the checkpoint range the change lies in, not the row.
//!
//! **Row formats.** A row written with a random 32-byte `salt` (format 2, every row since
//! evidence bundles) hashes *commitments* to its fields rather than the fields: each field
//! gets its own salt derived from the row's ([`field_salt`]) and a commitment over that
//! salt, its name and its value ([`field_commitment`]), and the row hash covers the 19
//! commitments in canonical order ([`row_hash_v2`]). Disclosing a field's value and salt
//! lets anyone recompute its commitment; disclosing only the commitment hides the value
//! (like SD-JWT disclosures), and the chain still re-hashes. The row's own salt is never
//! disclosed, since it would reveal every field's salt. Rows from before (no salt, format 1)
//! keep their plain [`row_hash`] and verify as before.
//!
//! - [`Record`]: the fields of one row; [`hash_row`]: its canonical encoding and hash.
//! - [`store`]: schema, the writer thread, [`store::AuditLog`].
//! - [`verify`]: the verifier behind `aegis audit verify`.
//! - [`bundle`], [`export`]: evidence bundles (`aegis audit export`, `verify-bundle`).

pub mod bundle;
pub mod evidence;
pub mod export;
pub mod merkle;
pub mod proof;
pub mod prove;
pub mod store;
pub mod verify;
pub mod witness;

use sha2::{Digest, Sha256};

/// The `audit_log` columns in the order the writer inserts them and the verifier reads
/// them (one list, so the two can never disagree).
macro_rules! audit_columns {
    () => {
        "seq, time_ns, http_status, kind, decision_id, tenant, agent, session, run_id, tool, action, resource, decision, reason, policy_revision, trust_level, approval_id, actor, trace_id, span_id, key_id, prev_hash, hash"
    };
}
pub(crate) use audit_columns;

/// A row's hash: SHA-256 over its canonical encoding.
pub type Hash = [u8; 32];

/// The `prev_hash` of the first row.
pub const GENESIS: Hash = [0u8; 32];

/// Domain tag of the row encoding (bumped if the field set ever changes).
const ROW_TAG: &[u8] = b"aegis-audit-row/v1\n";
/// Domain tags of format 2: the row, each field's salt, each field's commitment.
const ROW_V2_TAG: &[u8] = b"aegis-audit-row/v2\n";
const FIELD_SALT_TAG: &[u8] = b"aegis-audit-field-salt/v2\n";
const FIELD_TAG: &[u8] = b"aegis-audit-field/v2\n";
/// Domain tag of checkpoint signatures; never a valid JWT signing input.
const CHECKPOINT_TAG: &[u8] = b"aegis-audit-checkpoint/v1\n";
/// Domain tag of format 2 checkpoints, which also sign the Merkle tree head.
const CHECKPOINT_V2_TAG: &[u8] = b"aegis-audit-checkpoint/v2\n";

/// A row's random salt (format 2).
pub type Salt = [u8; 32];

/// The 19 fields of a row in canonical order: the two integers, then the text fields.
pub const FIELD_NAMES: [&str; 19] = [
    "time_ns",
    "http_status",
    "kind",
    "decision_id",
    "tenant",
    "agent",
    "session",
    "run_id",
    "tool",
    "action",
    "resource",
    "decision",
    "reason",
    "policy_revision",
    "trust_level",
    "approval_id",
    "actor",
    "trace_id",
    "span_id",
];

/// One field's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValue<'a> {
    /// An integer field (`time_ns`, `http_status`).
    Int(i64),
    /// A text field.
    Text(&'a str),
}

/// The fields of one audit row, as the Check (or control action) fills them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Decision time, Unix nanoseconds.
    pub time_ns: i64,
    /// `check` for a data-plane decision, `control` for an operator action.
    pub kind: String,
    /// Unique id of the decision, returned to Envoy and the agent.
    pub decision_id: String,
    /// The agent's tenant; for control actions, the tenant acted on.
    pub tenant: String,
    /// The agent (token `sub`); for control actions, the agent acted on (empty if none).
    pub agent: String,
    /// The agent's session (token `sid`); empty if none.
    pub session: String,
    /// The agent's run id (`x-aegis-run-id`); empty if not sent.
    pub run_id: String,
    /// The tool called; empty for control actions.
    pub tool: String,
    /// What the call did with the tool; for control actions, the action's name.
    pub action: String,
    /// What the call acted on (the route's resource or the request path); for control
    /// actions, the target.
    pub resource: String,
    /// `allow`, `deny`, `sanitize`, `approval_needed`, or `error`.
    pub decision: String,
    /// The reason code (`x-aegis-reason`), or the refusal or error.
    pub reason: String,
    /// HTTP status given to the agent (0 when the Check failed with a gRPC error).
    pub http_status: i64,
    /// The policy bundle's revision that decided; empty when no policy ran.
    pub policy_revision: String,
    /// `unspecified` or the `untrusted…` level the agent declared.
    pub trust_level: String,
    /// The approval this decision raised or redeemed; empty if none.
    pub approval_id: String,
    /// Who acted (control actions); empty for Checks.
    pub actor: String,
    /// The W3C trace id of the Check's span (hex); empty without one.
    pub trace_id: String,
    /// The span id of the Check's span (hex); empty without one.
    pub span_id: String,
}

/// The most bytes a text field of a row keeps. A longer value (a multi-megabyte path, a
/// tenant string sent to the control plane) is cut at a character boundary and marked
/// with its length and SHA-256, so the row says what it was without storing it: a row
/// holds at most 17 such fields whatever a request or a control call carries.
pub const MAX_FIELD_BYTES: usize = 1024;

/// Cuts `v` to [`MAX_FIELD_BYTES`] with the marker `…[truncated: N bytes, sha256:H]`,
/// where N and H are those of the whole value.
pub fn bound_field(v: &mut String) {
    if v.len() <= MAX_FIELD_BYTES {
        return;
    }
    let marker = format!(
        "…[truncated: {} bytes, sha256:{}]",
        v.len(),
        crate::hex(&Sha256::digest(v.as_bytes()))
    );
    let mut cut = MAX_FIELD_BYTES.saturating_sub(marker.len());
    while !v.is_char_boundary(cut) {
        cut -= 1;
    }
    v.truncate(cut);
    v.push_str(&marker);
}

impl Record {
    /// Every text field bounded ([`bound_field`]); the store does this to every row it
    /// appends.
    pub fn bounded(mut self) -> Self {
        for v in [
            &mut self.kind,
            &mut self.decision_id,
            &mut self.tenant,
            &mut self.agent,
            &mut self.session,
            &mut self.run_id,
            &mut self.tool,
            &mut self.action,
            &mut self.resource,
            &mut self.decision,
            &mut self.reason,
            &mut self.policy_revision,
            &mut self.trust_level,
            &mut self.approval_id,
            &mut self.actor,
            &mut self.trace_id,
            &mut self.span_id,
        ] {
            bound_field(v);
        }
        self
    }

    /// The text fields in canonical order, with their column names.
    pub fn text_fields(&self) -> [(&'static str, &str); 17] {
        [
            ("kind", &self.kind),
            ("decision_id", &self.decision_id),
            ("tenant", &self.tenant),
            ("agent", &self.agent),
            ("session", &self.session),
            ("run_id", &self.run_id),
            ("tool", &self.tool),
            ("action", &self.action),
            ("resource", &self.resource),
            ("decision", &self.decision),
            ("reason", &self.reason),
            ("policy_revision", &self.policy_revision),
            ("trust_level", &self.trust_level),
            ("approval_id", &self.approval_id),
            ("actor", &self.actor),
            ("trace_id", &self.trace_id),
            ("span_id", &self.span_id),
        ]
    }

    /// Every field in canonical order ([`FIELD_NAMES`]), with its name.
    pub fn fields(&self) -> [(&'static str, FieldValue<'_>); 19] {
        let t = self.text_fields();
        let mut out = [("", FieldValue::Int(0)); 19];
        out[0] = ("time_ns", FieldValue::Int(self.time_ns));
        out[1] = ("http_status", FieldValue::Int(self.http_status));
        for (slot, (name, text)) in out[2..].iter_mut().zip(t) {
            *slot = (name, FieldValue::Text(text));
        }
        out
    }
}

/// A row's hash: [`row_hash_v2`] over its commitments if it has a salt (format 2), else
/// [`row_hash`] (format 1).
pub fn hash_row(seq: u64, r: &Record, salt: Option<&Salt>, key_id: &str, prev: &Hash) -> Hash {
    match salt {
        Some(salt) => row_hash_v2(seq, &commitments(r, salt), key_id, prev),
        None => row_hash(seq, r, key_id, prev),
    }
}

/// SHA-256 of a row's canonical encoding: the tag, then `seq`, `time_ns`, `http_status` as
/// 8-byte big-endian integers, every text field as a 4-byte big-endian length and its
/// bytes, the key id the same way, and the previous row's hash. Length prefixes make the
/// encoding unambiguous: no two different rows encode alike.
pub fn row_hash(seq: u64, r: &Record, key_id: &str, prev: &Hash) -> Hash {
    row_hash_v1(seq, &r.fields().map(|(_, v)| v), key_id, prev)
}

/// [`row_hash`] over the values in canonical order (integers bare, texts length-prefixed).
pub fn row_hash_v1(seq: u64, values: &[FieldValue<'_>; 19], key_id: &str, prev: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(ROW_TAG);
    h.update(seq.to_be_bytes());
    for v in values {
        match v {
            FieldValue::Int(n) => h.update(n.to_be_bytes()),
            FieldValue::Text(t) => put_str(&mut h, t),
        }
    }
    put_str(&mut h, key_id);
    h.update(prev);
    h.finalize().into()
}

/// A field's own salt: SHA-256 over the tag, the row's salt and the field's name.
pub fn field_salt(row_salt: &Salt, name: &str) -> Hash {
    let mut h = Sha256::new();
    h.update(FIELD_SALT_TAG);
    h.update(row_salt);
    put_str(&mut h, name);
    h.finalize().into()
}

/// A field's commitment: SHA-256 over the tag, the field's salt, its name and its value
/// (length-prefixed; integers as their 8 big-endian bytes).
pub fn field_commitment(field_salt: &Hash, name: &str, value: FieldValue<'_>) -> Hash {
    let mut h = Sha256::new();
    h.update(FIELD_TAG);
    h.update(field_salt);
    put_str(&mut h, name);
    match value {
        FieldValue::Int(n) => {
            h.update(8u32.to_be_bytes());
            h.update(n.to_be_bytes());
        }
        FieldValue::Text(t) => put_str(&mut h, t),
    }
    h.finalize().into()
}

/// The commitments to every field of `r` in canonical order.
pub fn commitments(r: &Record, salt: &Salt) -> [Hash; 19] {
    r.fields()
        .map(|(name, v)| field_commitment(&field_salt(salt, name), name, v))
}

/// A format 2 row's hash: SHA-256 over the tag, `seq` (8 bytes big-endian), the 19 field
/// commitments in canonical order, the key id (length-prefixed) and the previous hash.
pub fn row_hash_v2(seq: u64, commitments: &[Hash; 19], key_id: &str, prev: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(ROW_V2_TAG);
    h.update(seq.to_be_bytes());
    for c in commitments {
        h.update(c);
    }
    put_str(&mut h, key_id);
    h.update(prev);
    h.finalize().into()
}

/// The message a checkpoint signs.
pub fn checkpoint_message(last_seq: u64, head: &Hash, time_ns: i64, key_id: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_TAG.len() + 8 + 32 + 8 + 4 + key_id.len());
    m.extend_from_slice(CHECKPOINT_TAG);
    m.extend_from_slice(&last_seq.to_be_bytes());
    m.extend_from_slice(head);
    m.extend_from_slice(&time_ns.to_be_bytes());
    m.extend_from_slice(&(key_id.len() as u32).to_be_bytes());
    m.extend_from_slice(key_id.as_bytes());
    m
}

/// The message a format 2 checkpoint signs: the chain head and the RFC 6962 tree head of
/// rows `1..=last_seq` (see [`proof`]), so one decision can be checked with an inclusion
/// proof instead of the whole chain.
pub fn checkpoint_message_v2(
    last_seq: u64,
    head: &Hash,
    root: &Hash,
    time_ns: i64,
    key_id: &str,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_V2_TAG.len() + 8 + 64 + 8 + 4 + key_id.len());
    m.extend_from_slice(CHECKPOINT_V2_TAG);
    m.extend_from_slice(&last_seq.to_be_bytes());
    m.extend_from_slice(head);
    m.extend_from_slice(root);
    m.extend_from_slice(&time_ns.to_be_bytes());
    m.extend_from_slice(&(key_id.len() as u32).to_be_bytes());
    m.extend_from_slice(key_id.as_bytes());
    m
}

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u32).to_be_bytes());
    h.update(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_cut_and_marked_with_the_whole_values_length_and_hash() {
        let mut short = "x".repeat(MAX_FIELD_BYTES);
        bound_field(&mut short);
        assert_eq!(short, "x".repeat(MAX_FIELD_BYTES), "at the cap: kept whole");
        // Multi-byte characters across the cut: it falls on a boundary.
        let whole = "é".repeat(3_000);
        let mut v = whole.clone();
        bound_field(&mut v);
        assert!(v.len() <= MAX_FIELD_BYTES, "{}", v.len());
        let marker = format!(
            "…[truncated: {} bytes, sha256:{}]",
            whole.len(),
            crate::hex(&Sha256::digest(whole.as_bytes()))
        );
        assert!(v.ends_with(&marker), "{v}");
        assert!(whole.starts_with(v.trim_end_matches(&marker)));
        let r = Record {
            resource: "/".repeat(3 << 20),
            tenant: "t".repeat(4 << 20),
            ..Default::default()
        }
        .bounded();
        assert!(
            r.text_fields()
                .iter()
                .all(|(_, v)| v.len() <= MAX_FIELD_BYTES)
        );
    }

    fn record() -> Record {
        let mut r = Record {
            time_ns: 1_700_000_000_000_000_000,
            http_status: 403,
            ..Default::default()
        };
        for (i, name) in FIELD_NAMES.iter().enumerate().skip(2) {
            r.set_text(name, &format!("{name}-{i}"));
        }
        r
    }

    impl Record {
        fn set_text(&mut self, name: &str, v: &str) {
            let slot = match name {
                "kind" => &mut self.kind,
                "decision_id" => &mut self.decision_id,
                "tenant" => &mut self.tenant,
                "agent" => &mut self.agent,
                "session" => &mut self.session,
                "run_id" => &mut self.run_id,
                "tool" => &mut self.tool,
                "action" => &mut self.action,
                "resource" => &mut self.resource,
                "decision" => &mut self.decision,
                "reason" => &mut self.reason,
                "policy_revision" => &mut self.policy_revision,
                "trust_level" => &mut self.trust_level,
                "approval_id" => &mut self.approval_id,
                "actor" => &mut self.actor,
                "trace_id" => &mut self.trace_id,
                "span_id" => &mut self.span_id,
                other => panic!("not a text field: {other}"),
            };
            *slot = v.to_owned();
        }
    }

    #[test]
    fn fields_are_in_canonical_order() {
        let r = record();
        let names: Vec<&str> = r.fields().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, FIELD_NAMES);
    }

    #[test]
    fn a_change_to_any_field_changes_the_v2_hash() {
        let salt = [7u8; 32];
        let base = record();
        let h = hash_row(5, &base, Some(&salt), "ed25519:k", &GENESIS);
        for name in FIELD_NAMES {
            let mut r = base.clone();
            match name {
                "time_ns" => r.time_ns += 1,
                "http_status" => r.http_status = 200,
                _ => r.set_text(name, "changed"),
            }
            assert_ne!(
                hash_row(5, &r, Some(&salt), "ed25519:k", &GENESIS),
                h,
                "{name}"
            );
        }
        // And so does the seq, the key id, the link and the salt.
        assert_ne!(hash_row(6, &base, Some(&salt), "ed25519:k", &GENESIS), h);
        assert_ne!(hash_row(5, &base, Some(&salt), "ed25519:j", &GENESIS), h);
        assert_ne!(hash_row(5, &base, Some(&salt), "ed25519:k", &[1; 32]), h);
        assert_ne!(hash_row(5, &base, Some(&[8; 32]), "ed25519:k", &GENESIS), h);
        // Format 2 never hashes like format 1.
        assert_ne!(hash_row(5, &base, None, "ed25519:k", &GENESIS), h);
    }

    #[test]
    fn disclosed_values_and_bare_commitments_rebuild_the_same_hash() {
        let salt = [9u8; 32];
        let r = record();
        let all = commitments(&r, &salt);
        // A verifier holding some values with their field salts and the other commitments.
        let rebuilt: Vec<Hash> = r
            .fields()
            .iter()
            .enumerate()
            .map(|(i, (name, v))| {
                if i % 2 == 0 {
                    field_commitment(&field_salt(&salt, name), name, *v)
                } else {
                    all[i]
                }
            })
            .collect();
        let rebuilt: [Hash; 19] = rebuilt.try_into().expect("19");
        assert_eq!(
            row_hash_v2(1, &rebuilt, "k", &GENESIS),
            hash_row(1, &r, Some(&salt), "k", &GENESIS)
        );
        // Field salts differ per field, so equal values commit differently.
        assert_ne!(field_salt(&salt, "agent"), field_salt(&salt, "session"));
    }

    #[test]
    fn the_v1_hash_is_unchanged() {
        // Pinned: a row hashed by the format 1 code before format 2 existed.
        let r = record();
        let h = row_hash(3, &r, "ed25519:k", &GENESIS);
        let mut legacy = Sha256::new();
        legacy.update(ROW_TAG);
        legacy.update(3u64.to_be_bytes());
        legacy.update(r.time_ns.to_be_bytes());
        legacy.update(r.http_status.to_be_bytes());
        for (_, t) in r.text_fields() {
            put_str(&mut legacy, t);
        }
        put_str(&mut legacy, "ed25519:k");
        legacy.update(GENESIS);
        assert_eq!(h, <Hash>::from(legacy.finalize()));
    }
}
