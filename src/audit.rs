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
//! - [`Record`]: the fields of one row; [`row_hash`]: its canonical encoding and hash.
//! - [`store`]: schema, the writer thread, [`store::AuditLog`].
//! - [`verify`]: the verifier behind `aegis audit verify`.

pub mod store;
pub mod verify;

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
/// Domain tag of checkpoint signatures; never a valid JWT signing input.
const CHECKPOINT_TAG: &[u8] = b"aegis-audit-checkpoint/v1\n";

/// The fields of one audit row, as the Check (or control action) fills them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Decision time, Unix nanoseconds.
    pub time_ns: i64,
    /// `check` for a data-plane decision, `control` for an operator action.
    pub kind: String,
    /// Unique id of the decision, returned to Envoy and the agent.
    pub decision_id: String,
    pub tenant: String,
    pub agent: String,
    pub session: String,
    pub run_id: String,
    pub tool: String,
    pub action: String,
    pub resource: String,
    /// `allow`, `deny`, `sanitize`, `approval_needed`, or `error`.
    pub decision: String,
    pub reason: String,
    /// HTTP status given to the agent (0 when the Check failed with a gRPC error).
    pub http_status: i64,
    pub policy_revision: String,
    pub trust_level: String,
    pub approval_id: String,
    /// Who acted (control actions); empty for Checks.
    pub actor: String,
    pub trace_id: String,
    pub span_id: String,
}

impl Record {
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
}

/// SHA-256 of a row's canonical encoding: the tag, then `seq`, `time_ns`, `http_status` as
/// 8-byte big-endian integers, every text field as a 4-byte big-endian length and its
/// bytes, the key id the same way, and the previous row's hash. Length prefixes make the
/// encoding unambiguous: no two different rows encode alike.
pub fn row_hash(seq: u64, r: &Record, key_id: &str, prev: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(ROW_TAG);
    h.update(seq.to_be_bytes());
    h.update(r.time_ns.to_be_bytes());
    h.update(r.http_status.to_be_bytes());
    for (_, text) in r.text_fields() {
        put_str(&mut h, text);
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

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u32).to_be_bytes());
    h.update(s.as_bytes());
}
