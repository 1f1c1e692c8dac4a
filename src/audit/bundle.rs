//! Evidence bundles: the file `aegis audit export` writes and `aegis audit verify-bundle`
//! checks.
//!
//! A bundle is one JSON document ([`Bundle`]) holding a contiguous run of audit rows, the
//! signed checkpoints over them and the public keys that signed those, plus the tenant's
//! incidents, approvals and policy revisions from `control.db`. Rows are disclosed field
//! by field (format v2, see [`super`]): a disclosed field carries its value and its
//! per-field salt, a redacted one only its commitment. Rows that were not selected (other
//! tenants', outside the filters) are all commitments, so the chain re-hashes without
//! revealing anything of them.
//!
//! **Canonical form and `bundle_hash`.** `bundle_hash` is the lower-case hex SHA-256 of
//! the compact `serde_json` serialization of the [`Bundle`] struct (fields in declaration
//! order, maps sorted by key) with `bundle_hash` set to the empty string. The verifier
//! parses the file into the struct and re-serializes it, so whitespace does not matter,
//! content does.
//!
//! **The bundle signature.** The hash alone is unkeyed: anyone can edit a bundle and
//! re-seal it. The checkpoint signatures prove the rows, but not the incidents, approvals
//! and policy revisions beside them. So the exporter signs the `bundle_hash` with the data
//! directory's key ([`signing_message`]), and the verifier checks that signature over the
//! whole bundle; pinned with `--public-key`, it also says whose key it is.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{FIELD_NAMES, FieldValue, Hash, checkpoint_message, checkpoint_message_v2};
use crate::types::Severity;

/// The `schema` of bundles this version writes and reads. Version 2 adds the bundle
/// signature; a version 1 bundle (unsigned beyond its rows) is refused: re-export it.
pub const SCHEMA: &str = "aegis-evidence-bundle/2";

/// What the exporter signs: the schema, a newline, and the `bundle_hash`.
pub fn signing_message(bundle_hash: &str) -> Vec<u8> {
    format!("{SCHEMA}\n{bundle_hash}").into_bytes()
}

/// Row fields that can never be redacted: a verifier needs them to check that every
/// selected row belongs to the bundle's tenant and to recount the summary.
pub const PROTECTED_FIELDS: [&str; 3] = ["tenant", "kind", "decision"];

/// Names `--redact` accepts: the audit rows' text fields except [`PROTECTED_FIELDS`], and
/// `arguments` (the tool arguments kept with approvals).
pub fn redactable() -> Vec<&'static str> {
    FIELD_NAMES
        .iter()
        .copied()
        .filter(|n| !matches!(*n, "time_ns" | "http_status") && !PROTECTED_FIELDS.contains(n))
        .chain(["arguments"])
        .collect()
}

/// The whole bundle, in canonical field order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// The bundle format, [`SCHEMA`]; any other is refused.
    pub schema: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The selection the exporter was asked for.
    pub filters: Filters,
    /// The field names redacted (see [`redactable`]).
    pub redaction: Vec<String>,
    /// The public keys the included checkpoints were signed with.
    pub keys: Vec<BundleKey>,
    /// A contiguous run of rows holding every selected one, in order, with their chain links.
    pub rows: Vec<BundleRow>,
    /// The signed checkpoints over those rows.
    pub checkpoints: Vec<BundleCheckpoint>,
    /// The tenant's incidents (rows of `control.db`), redacted as the bundle says.
    pub incidents: Vec<SideRecord>,
    /// The tenant's approvals, redacted as the bundle says.
    pub approvals: Vec<SideRecord>,
    /// The tenant's policy revisions, redacted as the bundle says.
    pub policy_revisions: Vec<SideRecord>,
    /// What the bundle says it holds; verification recounts and compares.
    pub counts: Counts,
    /// The exporter's signature over `bundle_hash` (see the module docs).
    #[serde(default)]
    pub signature: BundleSignature,
    /// See the module docs.
    pub bundle_hash: String,
}

/// An Ed25519 signature over [`signing_message`] of the bundle's hash.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSignature {
    /// The signer's key id; its public key is among the bundle's `keys`.
    pub key_id: String,
    /// 128 hex digits.
    pub signature: String,
}

/// What was asked for. `tenant` is `*` for an all-tenant (admin) bundle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    /// The tenant whose rows are selected; `*` for every tenant.
    pub tenant: String,
    /// Only the rows of this incident's agent and window; `None` for no incident filter.
    pub incident: Option<String>,
    /// RFC 3339; rows with `since <= time < until`.
    pub since: Option<String>,
    /// RFC 3339; rows before it (exclusive); `None` for no upper bound.
    pub until: Option<String>,
    /// Only this agent's rows; `None` for every agent.
    pub agent: Option<String>,
    /// `check` or `control`.
    pub kind: Option<String>,
    /// Incidents at or above: low < medium < high < critical.
    pub min_severity: Option<String>,
}

/// A public key a bundle's checkpoints or signature were made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleKey {
    /// The key id (`ed25519:` and 16 hex digits of the key's SHA-256).
    pub key_id: String,
    /// Ed25519 public key, 64 hex digits (the format of `signing.pub`).
    pub public_key: String,
}

/// One audit row. `format` 2: every field is disclosed (`value` and `salt`) or redacted
/// (`commitment`). `format` 1 (a row written before salts): every field is a `value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRow {
    /// The row's position in the log, from 1.
    pub seq: u64,
    /// The row's hash format: 1 (values only) or 2 (per-field salts).
    pub format: u8,
    /// The id of the key that signed the checkpoints over this row.
    pub key_id: String,
    /// The previous row's hash, hex (the genesis hash for row 1).
    pub prev_hash: String,
    /// This row's hash, hex: what the next row's `prev_hash` and the checkpoints commit to.
    pub hash: String,
    /// Matched the filters; false for rows only included to keep the chain contiguous.
    pub selected: bool,
    /// Every field of the row by name, disclosed or redacted.
    pub fields: BTreeMap<String, BundleField>,
    /// For a selected row: its RFC 6962 audit path (hex hashes, bottom-up) in the tree the
    /// bundle's last checkpoint signs, so the row can be checked alone, without the bundle's
    /// other rows (see [`super::proof`]). Absent when that checkpoint predates tree heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inclusion: Option<Vec<String>>,
}

/// One field of a row: a value with its salt (disclosed) or a commitment (redacted).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleField {
    /// A JSON integer for `time_ns` and `http_status`, a string otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// The field's own salt (hex), never the row's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// hex SHA-256 commitment to a redacted value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commitment: Option<String>,
}

/// A signed checkpoint as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleCheckpoint {
    /// The last row the checkpoint covers.
    pub last_seq: u64,
    /// That row's hash, hex.
    pub head_hash: String,
    /// When the checkpoint was signed, Unix nanoseconds.
    pub time_ns: i64,
    /// The id of the key that signed it.
    pub key_id: String,
    /// Ed25519 signature, hex.
    pub signature: String,
    /// The RFC 6962 tree head of rows `1..=last_seq` it signs (format 2 checkpoints), hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

/// A row of `control.db` (incident, approval, policy revision): its columns, minus those
/// the redaction policy removed, which are named in `redacted`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideRecord {
    /// The record's columns by name, minus the redacted ones.
    pub fields: BTreeMap<String, Value>,
    /// The names of the columns the redaction policy removed.
    pub redacted: Vec<String>,
}

/// The bundle's own tally of what it holds; a verifier recounts every number.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    /// Rows that matched the filters.
    pub rows_selected: u64,
    /// Rows in the bundle, the selected ones and those that keep the chain contiguous.
    pub rows_included: u64,
    /// Selected rows by decision and by kind.
    pub by_decision: BTreeMap<String, u64>,
    /// Selected rows by kind (`check`, `control`).
    pub by_kind: BTreeMap<String, u64>,
    /// Checkpoints in the bundle.
    pub checkpoints: u64,
    /// Incident records in the bundle.
    pub incidents: u64,
    /// Approval records in the bundle.
    pub approvals: u64,
    /// Policy revision records in the bundle.
    pub policy_revisions: u64,
}

/// The `control.db` tables a bundle carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// The `incidents` table.
    Incidents,
    /// The `approvals` table.
    Approvals,
    /// The `policy_revisions` table.
    PolicyRevisions,
}

impl Table {
    /// The table's name in `control.db`.
    pub fn name(self) -> &'static str {
        match self {
            Table::Incidents => "incidents",
            Table::Approvals => "approvals",
            Table::PolicyRevisions => "policy_revisions",
        }
    }

    /// The columns of this table a redacted field name removes.
    pub fn columns_for(self, field: &str) -> &'static [&'static str] {
        match (self, field) {
            (Table::Incidents, "agent") => &["agent"],
            (Table::Incidents, "session") => &["session"],
            (Table::Incidents, "run_id") => &["run_id"],
            (Table::Incidents, "decision_id") => &["evidence", "trigger_decision"],
            (Table::Incidents, "actor") => &["acknowledged_by", "closed_by", "reported_by"],
            (Table::Incidents, "policy_revision") => &["policy_revision"],
            (Table::Approvals, "agent") => &["agent"],
            (Table::Approvals, "session") => &["session"],
            (Table::Approvals, "run_id") => &["run_id"],
            (Table::Approvals, "tool") => &["tool"],
            (Table::Approvals, "action") => &["action"],
            // The call hash covers the resource and the arguments: a guess could be confirmed.
            (Table::Approvals, "resource") => &["resource", "call_hash"],
            (Table::Approvals, "arguments") => &["arguments", "call_hash"],
            (Table::Approvals, "decision_id") => &["decision_id", "used_by_decision"],
            (Table::Approvals, "reason") => &["policy_reason", "decision_reason"],
            (Table::Approvals, "actor") => &["decided_by"],
            (Table::Approvals, "approval_id") => &["id"],
            (Table::PolicyRevisions, "actor") => &["actor"],
            (Table::PolicyRevisions, "reason") => &["reason"],
            (Table::PolicyRevisions, "policy_revision") => &["revision"],
            _ => &[],
        }
    }

    /// Columns never removed: the verifier checks the tenant, the severity and the id.
    pub fn protected(self, column: &str) -> bool {
        match self {
            Table::Incidents => matches!(column, "id" | "tenant" | "severity" | "status"),
            Table::Approvals => matches!(column, "tenant" | "status"),
            Table::PolicyRevisions => matches!(column, "id"),
        }
    }
}

// === impl Bundle ===

impl Bundle {
    /// The canonical hash (see the module docs).
    pub fn canonical_hash(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.bundle_hash = String::new();
        unsealed.signature = BundleSignature::default();
        // Serializing plain structs, maps with string keys and JSON values cannot fail.
        let bytes = serde_json::to_vec(&unsealed).unwrap_or_default();
        crate::hex(&Sha256::digest(&bytes))
    }

    /// Sets `bundle_hash` (and clears a signature, which no longer covers it).
    pub fn seal(&mut self) {
        self.bundle_hash = self.canonical_hash();
        self.signature = BundleSignature::default();
    }

    /// Seals the bundle and signs its hash with `signer`, whose public key must be among
    /// the bundle's `keys`.
    pub fn sign(&mut self, signer: &crate::keys::Signer) {
        self.seal();
        self.signature = BundleSignature {
            key_id: signer.kid().to_owned(),
            signature: crate::hex(&signer.sign(&signing_message(&self.bundle_hash))),
        };
    }

    /// The counts the bundle's contents imply.
    pub fn recount(&self) -> Counts {
        let mut c = Counts {
            rows_included: self.rows.len() as u64,
            checkpoints: self.checkpoints.len() as u64,
            incidents: self.incidents.len() as u64,
            approvals: self.approvals.len() as u64,
            policy_revisions: self.policy_revisions.len() as u64,
            ..Default::default()
        };
        for row in self.rows.iter().filter(|r| r.selected) {
            c.rows_selected += 1;
            if let Some(d) = row.text("decision") {
                *c.by_decision.entry(d.to_owned()).or_default() += 1;
            }
            if let Some(k) = row.text("kind") {
                *c.by_kind.entry(k.to_owned()).or_default() += 1;
            }
        }
        c
    }
}

impl BundleRow {
    /// A disclosed text field.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.fields.get(name)?.value.as_ref()?.as_str()
    }
}

/// What [`verify`] concluded.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every problem found, each naming where (`row 17: ...`); empty if the bundle holds.
    pub problems: Vec<String>,
    /// Every checkpoint's key and the bundle's signer were among the trusted keys given.
    pub pinned: bool,
    /// The key ids that signed the checkpoints.
    pub signers: Vec<String>,
}

/// Checks everything a bundle claims: its schema, its hash, every row's hash from its
/// disclosed values and commitments, the links between rows, the checkpoint signatures
/// (with the embedded keys; if `trusted` is given, those keys must be among them), that
/// the last row is covered by a signed checkpoint, the counts, that every selected row,
/// incident and approval belongs to the bundle's tenant and filters, and that no field the
/// redaction policy names is disclosed anywhere.
pub fn verify(b: &Bundle, trusted: Option<&[VerifyingKey]>) -> Report {
    let mut report = Report::default();
    let p = &mut report.problems;
    if b.schema != SCHEMA {
        p.push(format!(
            "schema: {:?} is not {SCHEMA:?}, the version this aegis reads",
            b.schema
        ));
    }
    if b.bundle_hash != b.canonical_hash() {
        p.push("bundle_hash does not match the bundle's contents".into());
    }
    let allowed = redactable();
    for name in &b.redaction {
        if !allowed.contains(&name.as_str()) {
            p.push(format!(
                "redaction: {name:?} is not a field that can be redacted"
            ));
        }
    }
    let keys = check_keys(b, p);
    let signer_pinned = check_signature(b, &keys, trusted, p);
    let hashes = check_rows(b, p);
    let (pinned, mut signers) = check_checkpoints(b, &keys, &hashes, trusted, p);
    check_inclusion(b, &hashes, p);
    report.pinned = pinned && signer_pinned;
    if !b.signature.key_id.is_empty() && !signers.contains(&b.signature.key_id) {
        signers.push(b.signature.key_id.clone());
    }
    report.signers = signers;
    check_side_records(b, p);
    check_counts(b, p);
    report
}

/// The exporter's signature over the whole bundle; whether its key is trusted (when
/// trusted keys are given).
fn check_signature(
    b: &Bundle,
    keys: &HashMap<String, VerifyingKey>,
    trusted: Option<&[VerifyingKey]>,
    p: &mut Vec<String>,
) -> bool {
    let s = &b.signature;
    if s.key_id.is_empty() && s.signature.is_empty() {
        p.push(
            "signature: the bundle is not signed, so nothing proves its incidents, \
             approvals and policy revisions"
                .into(),
        );
        return false;
    }
    let Some(key) = keys.get(&s.key_id) else {
        p.push(format!(
            "signature: signed by key {}, which the bundle does not include",
            s.key_id
        ));
        return false;
    };
    let sig = crate::unhex(&s.signature).and_then(|s| <[u8; 64]>::try_from(s).ok());
    let ok = sig.is_some_and(|sig| {
        key.verify_strict(
            &signing_message(&b.bundle_hash),
            &Signature::from_bytes(&sig),
        )
        .is_ok()
    });
    if !ok {
        p.push(format!(
            "signature: does not verify with key {}: the bundle was changed after it \
             was signed",
            s.key_id
        ));
        return false;
    }
    match trusted {
        Some(trusted) if !trusted.contains(key) => {
            p.push(format!(
                "signature: signed by key {}, which is not among the trusted keys",
                s.key_id
            ));
            false
        }
        Some(_) => true,
        None => false,
    }
}

fn parse_hash(s: &str) -> Option<Hash> {
    crate::unhex(s).and_then(|b| Hash::try_from(b.as_slice()).ok())
}

fn check_keys(b: &Bundle, p: &mut Vec<String>) -> HashMap<String, VerifyingKey> {
    let mut keys = HashMap::new();
    for k in &b.keys {
        let Some(vk) = parse_hash(&k.public_key).and_then(|b| VerifyingKey::from_bytes(&b).ok())
        else {
            p.push(format!(
                "keys: {}: public key is not a 64-digit hex Ed25519 key",
                k.key_id
            ));
            continue;
        };
        if crate::keys::key_id(&vk) != k.key_id {
            p.push(format!(
                "keys: {}: the key id does not match its public key",
                k.key_id
            ));
            continue;
        }
        keys.insert(k.key_id.clone(), vk);
    }
    keys
}

/// Re-hashes and re-links the rows; returns each row's (verified or not) stored hash by seq.
fn check_rows(b: &Bundle, p: &mut Vec<String>) -> HashMap<u64, Hash> {
    let mut hashes = HashMap::new();
    if b.rows.is_empty() {
        p.push("rows: the bundle holds no audit rows".into());
    }
    let redacted: BTreeSet<&str> = b.redaction.iter().map(String::as_str).collect();
    let since = b.filters.since.as_deref().map(crate::time::parse);
    let until = b.filters.until.as_deref().map(crate::time::parse);
    let mut prev: Option<(u64, Hash)> = None;
    for row in &b.rows {
        let seq = row.seq;
        let (Some(hash), Some(prev_hash)) = (parse_hash(&row.hash), parse_hash(&row.prev_hash))
        else {
            p.push(format!("row {seq}: hash or prev_hash is not 64 hex digits"));
            continue;
        };
        if let Some((pseq, phash)) = prev {
            if seq != pseq + 1 {
                p.push(if seq > pseq {
                    format!(
                        "row {seq} follows row {pseq}: rows {}..={} are missing",
                        pseq + 1,
                        seq - 1
                    )
                } else {
                    format!("row {seq} follows row {pseq}: rows out of order")
                });
            } else if prev_hash != phash {
                p.push(format!(
                    "row {seq}: prev_hash does not link to row {pseq}'s hash"
                ));
            }
        }
        prev = Some((seq, hash));
        hashes.insert(seq, hash);
        match recompute(row) {
            Ok(h) if h == hash => {}
            Ok(_) => p.push(format!("row {seq}: hash does not match its fields")),
            Err(e) => p.push(format!("row {seq}: {e}")),
        }
        // Disclosure follows selection and the redaction policy.
        for (name, field) in &row.fields {
            if field.value.is_none() {
                continue;
            }
            if !row.selected {
                p.push(format!(
                    "row {seq}: not selected, yet discloses its {name} (another tenant's row?)"
                ));
            } else if redacted.contains(name.as_str()) {
                p.push(format!(
                    "row {seq}: field {name} is redacted by the bundle's policy but discloses a value"
                ));
            }
        }
        if !row.selected {
            continue;
        }
        for name in PROTECTED_FIELDS {
            if row.text(name).is_none() {
                p.push(format!(
                    "row {seq}: selected, but its {name} is not disclosed"
                ));
            }
        }
        let f = &b.filters;
        if let Some(t) = row.text("tenant")
            && f.tenant != "*"
            && t != f.tenant
        {
            p.push(format!(
                "row {seq}: belongs to tenant {t:?}, not the bundle's tenant {:?}",
                f.tenant
            ));
        }
        if let (Some(want), Some(k)) = (&f.kind, row.text("kind"))
            && want != k
        {
            p.push(format!(
                "row {seq}: kind {k:?} is outside the filter {want:?}"
            ));
        }
        if let (Some(want), Some(a)) = (&f.agent, row.text("agent"))
            && want != a
        {
            p.push(format!(
                "row {seq}: agent {a:?} is outside the filter {want:?}"
            ));
        }
        let time = row
            .fields
            .get("time_ns")
            .and_then(|f| f.value.as_ref())
            .and_then(Value::as_i64);
        if let Some(t) = time {
            let before = matches!(since, Some(Ok(s)) if t < s);
            let after = matches!(until, Some(Ok(u)) if t >= u);
            if before || after {
                p.push(format!("row {seq}: its time is outside the filter's range"));
            }
        }
    }
    for (name, t) in [("since", &since), ("until", &until)] {
        if let Some(Err(e)) = t {
            p.push(format!("filters: {name}: {e}"));
        }
    }
    hashes
}

/// The row's hash from its disclosed values, salts and commitments.
pub(super) fn recompute(row: &BundleRow) -> Result<Hash, String> {
    for name in row.fields.keys() {
        if !FIELD_NAMES.contains(&name.as_str()) {
            return Err(format!("unknown field {name}"));
        }
    }
    let field = |name: &str| {
        row.fields
            .get(name)
            .ok_or_else(|| format!("field {name} is missing"))
    };
    match row.format {
        1 => {
            if !row.selected {
                return Err("a format 1 row cannot be included unselected".into());
            }
            let mut values = Vec::with_capacity(FIELD_NAMES.len());
            for name in FIELD_NAMES {
                let f = field(name)?;
                if f.salt.is_some() || f.commitment.is_some() {
                    return Err(format!(
                        "field {name}: a format 1 row has no salts or commitments"
                    ));
                }
                values.push(value_of(name, f.value.as_ref())?);
            }
            let values: [FieldValue<'_>; 19] = values
                .try_into()
                .map_err(|_| "wrong number of fields".to_owned())?;
            let prev = parse_hash(&row.prev_hash).ok_or("prev_hash is not 64 hex digits")?;
            Ok(super::row_hash_v1(row.seq, &values, &row.key_id, &prev))
        }
        2 => {
            let mut commitments = [[0u8; 32]; 19];
            for (slot, name) in commitments.iter_mut().zip(FIELD_NAMES) {
                let f = field(name)?;
                *slot = match (&f.value, &f.salt, &f.commitment) {
                    (Some(v), Some(salt), None) => {
                        let salt = parse_hash(salt)
                            .ok_or_else(|| format!("field {name}: salt is not 64 hex digits"))?;
                        super::field_commitment(&salt, name, value_of(name, Some(v))?)
                    }
                    (None, None, Some(c)) => parse_hash(c)
                        .ok_or_else(|| format!("field {name}: commitment is not 64 hex digits"))?,
                    _ => {
                        return Err(format!(
                            "field {name}: must be either a value with its salt or a commitment"
                        ));
                    }
                };
            }
            let prev = parse_hash(&row.prev_hash).ok_or("prev_hash is not 64 hex digits")?;
            Ok(super::row_hash_v2(
                row.seq,
                &commitments,
                &row.key_id,
                &prev,
            ))
        }
        other => Err(format!("unknown row format {other}")),
    }
}

fn value_of<'a>(name: &str, v: Option<&'a Value>) -> Result<FieldValue<'a>, String> {
    let int = matches!(name, "time_ns" | "http_status");
    match v {
        Some(Value::Number(n)) if int => n
            .as_i64()
            .map(FieldValue::Int)
            .ok_or_else(|| format!("field {name}: not a 64-bit integer")),
        Some(Value::String(s)) if !int => Ok(FieldValue::Text(s)),
        Some(_) => Err(format!(
            "field {name}: value must be {}",
            if int { "an integer" } else { "a string" }
        )),
        None => Err(format!("field {name}: no value")),
    }
}

/// Returns (every signer trusted, signer key ids).
fn check_checkpoints(
    b: &Bundle,
    keys: &HashMap<String, VerifyingKey>,
    hashes: &HashMap<u64, Hash>,
    trusted: Option<&[VerifyingKey]>,
    p: &mut Vec<String>,
) -> (bool, Vec<String>) {
    let (first, last) = match (b.rows.first(), b.rows.last()) {
        (Some(f), Some(l)) => (f.seq, l.seq),
        _ => return (false, Vec::new()),
    };
    let mut pinned = trusted.is_some();
    let mut signers = BTreeSet::new();
    let mut covered = false;
    for cp in &b.checkpoints {
        let at = cp.last_seq;
        if at < first || at > last {
            p.push(format!(
                "checkpoint at seq {at}: outside the bundle's rows {first}..={last}"
            ));
            continue;
        }
        let Some(key) = keys.get(&cp.key_id) else {
            p.push(format!(
                "checkpoint at seq {at}: signed by key {}, which the bundle does not include",
                cp.key_id
            ));
            continue;
        };
        let head = parse_hash(&cp.head_hash);
        let sig = crate::unhex(&cp.signature).and_then(|s| <[u8; 64]>::try_from(s).ok());
        let root = cp.root.as_deref().map(parse_hash);
        let message = match (head, root) {
            (Some(head), None) => Some(checkpoint_message(at, &head, cp.time_ns, &cp.key_id)),
            (Some(head), Some(Some(root))) => Some(checkpoint_message_v2(
                at, &head, &root, cp.time_ns, &cp.key_id,
            )),
            _ => None,
        };
        let ok = match (message, sig) {
            (Some(message), Some(sig)) => key
                .verify_strict(&message, &Signature::from_bytes(&sig))
                .is_ok(),
            _ => false,
        };
        if !ok {
            p.push(format!(
                "checkpoint at seq {at}: signature does not verify with key {}",
                cp.key_id
            ));
            continue;
        }
        signers.insert(cp.key_id.clone());
        if let Some(trusted) = trusted
            && !trusted.contains(key)
        {
            pinned = false;
            p.push(format!(
                "checkpoint at seq {at}: signed by key {}, which is not among the trusted keys",
                cp.key_id
            ));
        }
        if head.is_some() && hashes.get(&at).copied() != head {
            p.push(format!(
                "checkpoint at seq {at}: the signed head does not match row {at}'s hash"
            ));
            continue;
        }
        covered |= at == last;
    }
    if !covered {
        p.push(format!(
            "row {last}: the last row is not covered by a signed checkpoint"
        ));
    }
    (pinned && covered, signers.into_iter().collect())
}

/// Every selected row's audit path must lead to the tree head of the bundle's last
/// checkpoint (whose signature [`check_checkpoints`] checked), when that one has a tree
/// head; a selected row without one is a problem then, since the exporter always adds it.
fn check_inclusion(b: &Bundle, hashes: &HashMap<u64, Hash>, p: &mut Vec<String>) {
    let Some(last) = b.checkpoints.iter().max_by_key(|c| c.last_seq) else {
        return;
    };
    let Some(root) = last.root.as_deref() else {
        if let Some(r) = b.rows.iter().find(|r| r.inclusion.is_some()) {
            p.push(format!(
                "row {}: an inclusion proof, but the last checkpoint signs no tree head",
                r.seq
            ));
        }
        return;
    };
    let Some(root) = parse_hash(root) else {
        p.push(format!(
            "checkpoint at seq {}: root is not 64 hex digits",
            last.last_seq
        ));
        return;
    };
    let size = last.last_seq;
    for row in b
        .rows
        .iter()
        .filter(|r| r.selected || r.inclusion.is_some())
    {
        let seq = row.seq;
        let Some(path) = &row.inclusion else {
            p.push(format!("row {seq}: no inclusion proof"));
            continue;
        };
        let path: Option<Vec<Hash>> = path.iter().map(|h| parse_hash(h)).collect();
        let ok = match (path, hashes.get(&seq)) {
            (Some(path), Some(hash)) => {
                seq >= 1
                    && super::proof::verify_inclusion(
                        seq - 1,
                        size,
                        &super::proof::leaf_hash(hash),
                        &path,
                        &root,
                    )
            }
            _ => false,
        };
        if !ok {
            p.push(format!(
                "row {seq}: its inclusion proof does not lead to the tree head signed at seq {size}"
            ));
        }
    }
}

fn check_side_records(b: &Bundle, p: &mut Vec<String>) {
    let f = &b.filters;
    let min = f
        .min_severity
        .as_deref()
        .and_then(|s| s.parse::<Severity>().ok());
    let sets = [
        (Table::Incidents, &b.incidents),
        (Table::Approvals, &b.approvals),
        (Table::PolicyRevisions, &b.policy_revisions),
    ];
    for (table, records) in sets {
        let t = table.name();
        for (i, rec) in records.iter().enumerate() {
            let id = rec
                .fields
                .get("id")
                .map_or_else(|| format!("#{i}"), |v| v.to_string());
            for name in &b.redaction {
                for col in table.columns_for(name) {
                    if rec.fields.contains_key(*col) {
                        p.push(format!(
                            "{t} {id}: {col} is disclosed, but the bundle redacts {name}"
                        ));
                    }
                }
            }
            for col in &rec.redacted {
                if rec.fields.contains_key(col) {
                    p.push(format!("{t} {id}: {col} is both redacted and disclosed"));
                }
            }
            if table == Table::PolicyRevisions {
                continue;
            }
            let tenant = rec.fields.get("tenant").and_then(Value::as_str);
            if f.tenant != "*" && tenant != Some(f.tenant.as_str()) {
                p.push(format!(
                    "{t} {id}: belongs to tenant {}, not the bundle's tenant {:?}",
                    tenant.map_or_else(|| "(none)".into(), |t| format!("{t:?}")),
                    f.tenant
                ));
            }
            if let Some(want) = &f.agent
                && let Some(agent) = rec.fields.get("agent").and_then(Value::as_str)
                && agent != want
            {
                p.push(format!(
                    "{t} {id}: agent {agent:?} is outside the filter {want:?}"
                ));
            }
            if table != Table::Incidents {
                continue;
            }
            if let Some(want) = &f.incident
                && rec.fields.get("id").and_then(Value::as_str) != Some(want)
            {
                p.push(format!("{t} {id}: not the bundle's incident {want}"));
            }
            let rank = rec
                .fields
                .get("severity")
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<Severity>().ok());
            if let Some(min) = min
                && rank.is_none_or(|r| r < min)
            {
                p.push(format!("{t} {id}: below the minimum severity"));
            }
        }
    }
}

fn check_counts(b: &Bundle, p: &mut Vec<String>) {
    let want = b.recount();
    let got = &b.counts;
    let pairs = [
        ("rows_selected", got.rows_selected, want.rows_selected),
        ("rows_included", got.rows_included, want.rows_included),
        ("checkpoints", got.checkpoints, want.checkpoints),
        ("incidents", got.incidents, want.incidents),
        ("approvals", got.approvals, want.approvals),
        (
            "policy_revisions",
            got.policy_revisions,
            want.policy_revisions,
        ),
    ];
    for (name, claimed, actual) in pairs {
        if claimed != actual {
            p.push(format!(
                "counts: {name} says {claimed} but the bundle holds {actual}"
            ));
        }
    }
    if got.by_decision != want.by_decision {
        p.push(format!(
            "counts: by_decision says {:?} but the selected rows give {:?}",
            got.by_decision, want.by_decision
        ));
    }
    if got.by_kind != want.by_kind {
        p.push(format!(
            "counts: by_kind says {:?} but the selected rows give {:?}",
            got.by_kind, want.by_kind
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{parse as parse_time, rfc3339_nanos as format_time};

    #[test]
    fn times_parse_as_rfc3339_or_unix_seconds() {
        assert_eq!(parse_time("0"), Ok(0));
        assert_eq!(parse_time("1700000000"), Ok(1_700_000_000_000_000_000));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z"),
            Ok(1_700_000_000_000_000_000)
        );
        assert_eq!(
            parse_time("2023-11-14T23:13:20.5+01:00"),
            Ok(1_700_000_000_500_000_000)
        );
        assert_eq!(
            parse_time("2024-02-29T00:00:00Z"),
            Ok(1_709_164_800_000_000_000)
        );
        for bad in [
            "",
            "yesterday",
            "2023-11-14",
            "2023-13-01T00:00:00Z",
            "2023-11-14T22:13:20",
            "-5",
        ] {
            let err = parse_time(bad).expect_err(bad);
            assert!(err.contains("RFC 3339"), "{err}");
        }
    }

    #[test]
    fn times_round_trip_through_the_filters() {
        for ns in [0, 1_700_000_000_123_456_789, 1_709_164_800_000_000_000] {
            assert_eq!(parse_time(&format_time(ns)), Ok(ns), "{}", format_time(ns));
        }
    }

    #[test]
    fn redactable_fields_leave_out_what_a_verifier_needs() {
        let r = redactable();
        for needed in PROTECTED_FIELDS.iter().chain(&["time_ns", "http_status"]) {
            assert!(!r.contains(needed), "{needed}");
        }
        assert!(r.contains(&"resource") && r.contains(&"arguments"));
    }
}
