//! `aegis audit export`: builds an evidence [`Bundle`] from the data directory's
//! `audit.db` (and `control.db`, if there is one), read-only.
//!
//! Rows: the ones matching the filters are *selected*; the bundle holds every row from
//! the first selected one through the last row of the checkpoint covering the last
//! selected one, so the chain re-hashes end to end. Selected rows disclose every field
//! except the redacted ones; the others are commitments only.
//!
//! Rows written before salts (format 1) cannot be partially disclosed: export refuses a
//! range holding one unless it is selected and nothing is redacted, in which case it is
//! included whole.
//!
//! Redaction also removes the matching columns of incidents, approvals and policy
//! revisions ([`Table::columns_for`]), and then any other disclosed text (a reason, a
//! summary) that contains a redacted value: a redacted value appears nowhere in the bundle.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use rusqlite::{Connection, OpenFlags, params_from_iter};
use serde_json::Value;

use super::bundle::{
    Bundle, BundleCheckpoint, BundleField, BundleKey, BundleRow, Filters, PROTECTED_FIELDS, SCHEMA,
    SideRecord, Table, redactable,
};
use super::verify::{Row, read_rows_between};
use super::{FIELD_NAMES, FieldValue, Hash};
use std::sync::Arc;

use crate::config::{CONTROL_DB_FILE, ControlDatabase};
use crate::control::store::{ControlStore, Txn};
use crate::control::{ControlError, records};
use crate::time::rfc3339_nanos as format_time;
use crate::types::Severity;

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// A tenant, or `*` for every tenant.
    pub tenant: String,
    /// Only the rows of this incident's agent and window; `None`: no incident filter.
    pub incident: Option<String>,
    /// Unix nanoseconds; rows with `since <= time < until`.
    pub since: Option<i64>,
    /// Unix nanoseconds; rows before it (exclusive); `None`: no upper bound.
    pub until: Option<i64>,
    /// Only this agent's rows; `None`: every agent.
    pub agent: Option<String>,
    /// `check` or `control`.
    pub kind: Option<String>,
    /// Only incidents at or above this severity (low < medium < high < critical); `None`: all.
    pub min_severity: Option<String>,
    /// Field names to redact (see [`redactable`]).
    pub redact: Vec<String>,
    /// Public keys besides the data directory's `audit.pub` and `signing.pub` (e.g. keys
    /// rotated out).
    pub extra_keys: Vec<VerifyingKey>,
    /// The control database [default: `control.db` in the data directory, if there is
    /// one]. In a fleet, incidents and approvals live in the control plane's.
    pub control_db: Option<PathBuf>,
    /// The control store as a URL (`postgres://...` or `sqlite:PATH`), instead of
    /// `control_db`: the one the control-plane replicas share.
    pub control_database_url: Option<String>,
    /// The audit key the bundle is signed with [default: `audit.key` in the data
    /// directory; `signing.key` only for a log that never had format 2 checkpoints].
    pub audit_key: Option<PathBuf>,
}

/// Why nothing was exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The options are contradictory or out of range (which and why).
    #[error("{0}")]
    Invalid(String),
    /// A file the export needs could not be read.
    #[error("cannot read {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// No bundle can be made as asked: no row matches, a row is not covered by a checkpoint
    /// yet, or the bundle would not verify (why).
    #[error("{0}")]
    Refused(String),
}

/// Shortest redacted value searched for inside other text; shorter ones (`"a"`, `"42"`)
/// would match almost anything and are only removed where a field equals them.
const MIN_SUBSTRING: usize = 3;

/// Builds the bundle, sealed, and checks it with [`super::bundle::verify`] before
/// returning it: an audit log that does not verify is never exported.
pub fn export(data_dir: &Path, opts: &ExportOptions) -> Result<Bundle, ExportError> {
    validate(opts)?;
    let audit_path = data_dir.join(super::store::AUDIT_DB_FILE);
    let audit = open_read_only(&audit_path)?;
    let read = |e: rusqlite::Error| ExportError::Read {
        path: audit_path.clone(),
        message: e.to_string(),
    };
    let control = ControlSide::open(data_dir, opts)?;
    let control_path = control
        .as_ref()
        .map_or_else(|| PathBuf::from(CONTROL_DB_FILE), |c| c.shown.clone());
    let control_read = |e: ControlError| ExportError::Read {
        path: control_path.clone(),
        message: e.to_string(),
    };

    // The incident, if one was asked for: its evidence selects rows.
    let incident = match (&opts.incident, &control) {
        (None, _) => None,
        (Some(id), None) => {
            return Err(ExportError::Invalid(format!(
                "--incident {id}: there is no {}; in a fleet, pass the control plane's \
                 with --control-db or --control-database-url",
                data_dir.join(CONTROL_DB_FILE).display()
            )));
        }
        (Some(id), Some(c)) => {
            let rows = c.incidents().map_err(control_read)?;
            let found = rows
                .into_iter()
                .filter(|r| r.fields.get("id").and_then(Value::as_str) == Some(id.as_str()))
                .find(|r| tenant_matches(r, &opts.tenant));
            Some(found.ok_or_else(|| {
                ExportError::Invalid(format!(
                    "--incident {id}: no such incident for tenant {}",
                    opts.tenant
                ))
            })?)
        }
    };

    let selected = select_rows(&audit, opts, incident.as_ref()).map_err(read)?;
    let (Some(&first), Some(&last_selected)) = (selected.first(), selected.last()) else {
        return Err(ExportError::Refused(format!(
            "no audit rows of tenant {} match the filters",
            opts.tenant
        )));
    };
    let end: Option<i64> = audit
        .query_row(
            "SELECT min(last_seq) FROM audit_checkpoint WHERE last_seq >= ?1",
            [i64::try_from(last_selected).unwrap_or(i64::MAX)],
            |r| r.get(0),
        )
        .map_err(read)?;
    let end = end.and_then(|e| u64::try_from(e).ok()).ok_or_else(|| {
        ExportError::Refused(format!(
            "row {last_selected} is not covered by a signed checkpoint yet; \
             run `aegis audit verify`"
        ))
    })?;
    let rows = read_rows_between(&audit, first, end).map_err(read)?;
    let selected: BTreeSet<u64> = selected.into_iter().collect();
    check_v1(&rows, &selected, &opts.redact)?;

    let checkpoints = read_checkpoints(&audit, first, end).map_err(read)?;
    // The audit key signs the bundle: it vouches for everything in it. The token key
    // stands in only for a log it signed alone (before the audit key).
    let key_err = |path: PathBuf, e: crate::keys::KeyError| ExportError::Read {
        path,
        message: format!("the key that signs the bundle: {e}"),
    };
    let default_key = data_dir.join(crate::keys::AUDIT_KEY_FILE);
    let signer = match &opts.audit_key {
        Some(path) => crate::keys::Signer::load_file(path).map_err(|e| key_err(path.clone(), e))?,
        None if default_key.exists() || checkpoints.iter().any(|c| c.root.is_some()) => {
            crate::keys::Signer::load_file(&default_key)
                .map_err(|e| key_err(default_key.clone(), e))?
        }
        None => crate::keys::Signer::load(data_dir)
            .map_err(|e| key_err(data_dir.join(crate::keys::SIGNING_KEY_FILE), e))?,
    };
    let keys = keys_for(data_dir, opts, &checkpoints, &signer)?;

    // Side records.
    let selected_rows: Vec<&Row> = rows.iter().filter(|r| selected.contains(&r.seq)).collect();
    let (mut incidents, mut approvals, mut revisions) = match &control {
        None => (Vec::new(), Vec::new(), Vec::new()),
        Some(c) => side_records(c, opts, incident, &selected_rows).map_err(control_read)?,
    };

    let redact: BTreeSet<&str> = opts.redact.iter().map(String::as_str).collect();
    let secrets = redact_side_records(
        &selected_rows,
        &redact,
        [
            (Table::Incidents, &mut incidents),
            (Table::Approvals, &mut approvals),
            (Table::PolicyRevisions, &mut revisions),
        ],
    )?;
    let mut bundle_rows: Vec<BundleRow> = rows
        .iter()
        .map(|r| bundle_row(r, selected.contains(&r.seq), &redact, &secrets))
        .collect();
    if checkpoints
        .iter()
        .any(|c| c.last_seq == end && c.root.is_some())
    {
        add_inclusion_proofs(&audit, &rows, end, &mut bundle_rows).map_err(read)?;
    }
    let mut bundle = Bundle {
        schema: SCHEMA.into(),
        created_at: format_time(crate::unix_nanos()),
        filters: Filters {
            tenant: opts.tenant.clone(),
            incident: opts.incident.clone(),
            since: opts.since.map(format_time),
            until: opts.until.map(format_time),
            agent: opts.agent.clone(),
            kind: opts.kind.clone(),
            min_severity: opts.min_severity.clone(),
        },
        redaction: redact.iter().map(|s| (*s).to_owned()).collect(),
        keys,
        rows: bundle_rows,
        checkpoints,
        incidents,
        approvals,
        policy_revisions: revisions,
        counts: Default::default(),
        signature: Default::default(),
        bundle_hash: String::new(),
    };
    bundle.counts = bundle.recount();
    bundle.sign(&signer);
    let report = super::bundle::verify(&bundle, None);
    if let Some(problem) = report.problems.first() {
        return Err(ExportError::Refused(format!(
            "the bundle built from {} does not verify ({problem}); run `aegis audit verify`",
            audit_path.display()
        )));
    }
    Ok(bundle)
}

/// Applies the redaction policy to the side records: first the columns it names (see
/// [`Table::columns_for`]), then any other column holding one of the redacted values (of
/// the selected rows, or of a column just removed). Returns those values, for the rows.
fn redact_side_records(
    selected: &[&Row],
    redact: &BTreeSet<&str>,
    mut tables: [(Table, &mut Vec<SideRecord>); 3],
) -> Result<Secrets, ExportError> {
    let mut values: BTreeSet<String> = BTreeSet::new();
    for r in selected {
        for (name, v) in r.record.fields() {
            if let FieldValue::Text(t) = v
                && redact.contains(name)
                && !t.is_empty()
            {
                values.insert(t.to_owned());
            }
        }
    }
    for (table, records) in tables.iter_mut() {
        for rec in records.iter_mut() {
            for name in redact {
                for col in table.columns_for(name) {
                    if let Some(v) = rec.fields.remove(*col) {
                        collect_strings(&v, &mut values);
                        rec.redacted.push((*col).to_owned());
                    }
                }
            }
        }
    }
    let secrets = Secrets::new(values)?;
    for (table, records) in tables.iter_mut() {
        for rec in records.iter_mut() {
            let leaking: Vec<String> = rec
                .fields
                .iter()
                .filter(|(col, v)| !table.protected(col) && secrets.found_in_value(v))
                .map(|(col, _)| col.clone())
                .collect();
            for col in leaking {
                rec.fields.remove(&col);
                rec.redacted.push(col);
            }
            rec.redacted.sort();
            rec.redacted.dedup();
        }
    }
    Ok(secrets)
}

fn validate(opts: &ExportOptions) -> Result<(), ExportError> {
    let invalid = |m: String| Err(ExportError::Invalid(m));
    if opts.tenant.is_empty() {
        return invalid("--tenant is required (or '*' for every tenant)".into());
    }
    let allowed = redactable();
    for name in &opts.redact {
        if PROTECTED_FIELDS.contains(&name.as_str()) {
            return invalid(format!(
                "--redact {name}: {} cannot be redacted (a verifier checks them)",
                PROTECTED_FIELDS.join(", ")
            ));
        }
        if !allowed.contains(&name.as_str()) {
            return invalid(format!(
                "--redact {name}: not a field; one of {}",
                allowed.join(", ")
            ));
        }
    }
    if opts.agent.is_some() && opts.redact.iter().any(|r| r == "agent") {
        return invalid("--agent and --redact agent together: the filter would disclose it".into());
    }
    if let Some(k) = &opts.kind
        && k != "check"
        && k != "control"
    {
        return invalid(format!("--kind {k}: check or control"));
    }
    if let Some(s) = &opts.min_severity
        && s.parse::<Severity>().is_err()
    {
        return invalid(format!("--min-severity {s}: low, medium, high or critical"));
    }
    if let (Some(s), Some(u)) = (opts.since, opts.until)
        && s >= u
    {
        return invalid("--since must be before --until".into());
    }
    Ok(())
}

fn open_read_only(path: &Path) -> Result<Connection, ExportError> {
    let err = |message: String| ExportError::Read {
        path: path.to_path_buf(),
        message,
    };
    if !path.exists() {
        return Err(err("no such file".into()));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| err(e.to_string()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| err(e.to_string()))?;
    Ok(conn)
}

fn tenant_matches(rec: &SideRecord, tenant: &str) -> bool {
    tenant == "*" || rec.fields.get("tenant").and_then(Value::as_str) == Some(tenant)
}

/// Sequence numbers of the rows the filters select, ascending.
fn select_rows(
    conn: &Connection,
    opts: &ExportOptions,
    incident: Option<&SideRecord>,
) -> rusqlite::Result<Vec<u64>> {
    use rusqlite::types::Value as Sql;
    let mut clauses = vec!["1 = 1".to_owned()];
    let mut args: Vec<Sql> = Vec::new();
    let mut add = |clause: &str, v: Sql| {
        args.push(v);
        clauses.push(clause.replace('?', &format!("?{}", args.len())));
    };
    if opts.tenant != "*" {
        add("tenant = ?", Sql::Text(opts.tenant.clone()));
    }
    if let Some(k) = &opts.kind {
        add("kind = ?", Sql::Text(k.clone()));
    }
    if let Some(a) = &opts.agent {
        add("agent = ?", Sql::Text(a.clone()));
    }
    if let Some(s) = opts.since {
        add("time_ns >= ?", Sql::Integer(s));
    }
    if let Some(u) = opts.until {
        add("time_ns < ?", Sql::Integer(u));
    }
    let sql = format!(
        "SELECT seq, kind, decision_id, reason FROM audit_log WHERE {} ORDER BY seq",
        clauses.join(" AND ")
    );
    // An incident selects its evidence and the control actions that name it.
    let evidence: Option<(String, BTreeSet<String>)> = incident.map(|i| {
        let mut ids = BTreeSet::new();
        if let Some(Value::Array(ev)) = i.fields.get("evidence") {
            ids.extend(ev.iter().filter_map(Value::as_str).map(str::to_owned));
        }
        if let Some(t) = i.fields.get("trigger_decision").and_then(Value::as_str) {
            ids.insert(t.to_owned());
        }
        let id = i
            .fields
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        (id, ids)
    });
    let mut stmt = conn.prepare(&sql)?;
    let mut out = Vec::new();
    let mut rows = stmt.query(params_from_iter(args))?;
    while let Some(r) = rows.next()? {
        let seq = r.get::<_, i64>(0)?;
        if let Some((id, ids)) = &evidence {
            let kind: String = r.get(1)?;
            let decision_id: String = r.get(2)?;
            let reason: String = r.get(3)?;
            let linked = ids.contains(&decision_id)
                || (kind == "control" && !id.is_empty() && reason.contains(id.as_str()));
            if !linked {
                continue;
            }
        }
        if let Ok(seq) = u64::try_from(seq) {
            out.push(seq);
        }
    }
    Ok(out)
}

/// Refuses format 1 rows that would have to be partially disclosed.
fn check_v1(rows: &[Row], selected: &BTreeSet<u64>, redact: &[String]) -> Result<(), ExportError> {
    let v1: Vec<&Row> = rows.iter().filter(|r| r.salt.is_none()).collect();
    let (Some(lo), Some(hi)) = (v1.first(), v1.last()) else {
        return Ok(());
    };
    let range = format!("rows {}..={}", lo.seq, hi.seq);
    if let Some(r) = v1.iter().find(|r| !selected.contains(&r.seq)) {
        return Err(ExportError::Refused(format!(
            "{range} were written before per-field salts (format 1) and cannot be partially \
             disclosed, but row {} is not selected; export a later --since, or a bundle \
             where every row in that range is selected and nothing is redacted",
            r.seq
        )));
    }
    if !redact.is_empty() {
        return Err(ExportError::Refused(format!(
            "{range} were written before per-field salts (format 1) and cannot be redacted; \
             export them without --redact, or a later --since"
        )));
    }
    Ok(())
}

/// Adds each selected row's audit path in the tree of rows `1..=end` (see
/// [`BundleRow::inclusion`]). The heads of leaf ranges inside the bundle come from its rows;
/// those before it are streamed from the log once each (memoized: the paths of all rows
/// share them).
fn add_inclusion_proofs(
    conn: &Connection,
    rows: &[Row],
    end: u64,
    out: &mut [BundleRow],
) -> rusqlite::Result<()> {
    use super::merkle::{inclusion_proof, root_of};
    use super::proof::leaf_hash;
    let Some(first) = rows.first().map(|r| r.seq) else {
        return Ok(());
    };
    // Leaf i is row i + 1; the bundle holds leaves first-1..end.
    let inside: Vec<Hash> = rows.iter().map(|r| leaf_hash(&r.hash)).collect();
    let mut log = LogRanges::new(conn)?;
    // Heads of ranges inside the bundle, memoized: the paths of all rows share them.
    let mut memo: HashMap<(u64, u64), Hash> = HashMap::new();
    let mut range_root = |lo: u64, hi: u64| -> rusqlite::Result<Hash> {
        if lo + 1 >= first && hi <= end {
            if let Some(h) = memo.get(&(lo, hi)) {
                return Ok(*h);
            }
            let (a, b) = ((lo + 1 - first) as usize, (hi + 1 - first) as usize);
            let h = root_of(inside.get(a..b).ok_or(rusqlite::Error::InvalidQuery)?);
            memo.insert((lo, hi), h);
            return Ok(h);
        }
        log.root(lo, hi)
    };
    for row in out.iter_mut().filter(|r| r.selected) {
        let Some(index) = row.seq.checked_sub(1) else {
            continue; // not a log position: the bundle's own check refuses it
        };
        let path = inclusion_proof(index, end, &mut range_root)?;
        row.inclusion = Some(path.iter().map(|h| crate::hex(h)).collect());
    }
    Ok(())
}

/// Tree heads of leaf ranges of the log, streamed from its rows and memoized (the proofs
/// of many rows, and the two halves of a consistency proof, share them).
pub(super) struct LogRanges<'c> {
    stmt: rusqlite::Statement<'c>,
    memo: HashMap<(u64, u64), Hash>,
}

impl<'c> LogRanges<'c> {
    pub(super) fn new(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            stmt: conn
                .prepare("SELECT hash FROM audit_log WHERE seq > ?1 AND seq <= ?2 ORDER BY seq")?,
            memo: HashMap::new(),
        })
    }

    /// The tree head of leaves `lo..hi` (rows `lo + 1..=hi`).
    pub(super) fn root(&mut self, lo: u64, hi: u64) -> rusqlite::Result<Hash> {
        if let Some(h) = self.memo.get(&(lo, hi)) {
            return Ok(*h);
        }
        let mut f = super::merkle::Frontier::new();
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for h in self
            .stmt
            .query_map([to_i64(lo), to_i64(hi)], |r| r.get::<_, Vec<u8>>(0))?
        {
            f.push(super::proof::leaf_hash(&h?));
        }
        if f.size() != hi - lo {
            return Err(rusqlite::Error::InvalidQuery);
        }
        let root = f.root();
        self.memo.insert((lo, hi), root);
        Ok(root)
    }
}

fn read_checkpoints(
    conn: &Connection,
    first: u64,
    end: u64,
) -> rusqlite::Result<Vec<BundleCheckpoint>> {
    let root = if super::verify::has_root_column(conn)? {
        "root"
    } else {
        "NULL"
    };
    let mut stmt = conn.prepare(&format!(
        "SELECT last_seq, head_hash, time_ns, key_id, signature, {root} FROM audit_checkpoint \
         WHERE last_seq >= ?1 AND last_seq <= ?2 ORDER BY last_seq, id"
    ))?;
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let cps = stmt.query_map([to_i64(first), to_i64(end)], |r| {
        Ok(BundleCheckpoint {
            last_seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
            head_hash: crate::hex(&r.get::<_, Vec<u8>>(1)?),
            time_ns: r.get(2)?,
            key_id: r.get(3)?,
            signature: crate::hex(&r.get::<_, Vec<u8>>(4)?),
            root: r.get::<_, Option<Vec<u8>>>(5)?.map(|h| crate::hex(&h)),
        })
    })?;
    cps.collect()
}

/// The public keys of the checkpoints' signers, from `audit.pub`, `signing.pub` (logs begun
/// before the audit key was split off) and `--public-key`,
/// and of the bundle's `signer`.
fn keys_for(
    data_dir: &Path,
    opts: &ExportOptions,
    checkpoints: &[BundleCheckpoint],
    signer: &crate::keys::Signer,
) -> Result<Vec<BundleKey>, ExportError> {
    let mut known: HashMap<String, VerifyingKey> = opts
        .extra_keys
        .iter()
        .map(|k| (crate::keys::key_id(k), *k))
        .collect();
    let own = data_dir.join(crate::keys::AUDIT_PUBLIC_KEY_FILE);
    for file in [
        crate::keys::AUDIT_PUBLIC_KEY_FILE,
        crate::keys::PUBLIC_KEY_FILE,
    ] {
        let path = data_dir.join(file);
        if path.exists() {
            let k = crate::keys::read_public_key(&path).map_err(|e| ExportError::Read {
                path: path.clone(),
                message: e.to_string(),
            })?;
            known.insert(crate::keys::key_id(&k), k);
        }
    }
    let mut keys: BTreeMap<String, BundleKey> = BTreeMap::new();
    for cp in checkpoints {
        let Some(k) = known.get(&cp.key_id) else {
            return Err(ExportError::Invalid(format!(
                "checkpoint at seq {} was signed by key {}, which is not {} nor any \
                 --public-key given",
                cp.last_seq,
                cp.key_id,
                own.display()
            )));
        };
        keys.entry(cp.key_id.clone()).or_insert_with(|| BundleKey {
            key_id: cp.key_id.clone(),
            public_key: crate::hex(k.as_bytes()),
        });
    }
    keys.entry(signer.kid().to_owned())
        .or_insert_with(|| BundleKey {
            key_id: signer.kid().to_owned(),
            public_key: crate::hex(signer.verifying_key().as_bytes()),
        });
    Ok(keys.into_values().collect())
}

/// Incidents, approvals and policy revisions for the filters.
/// Incidents, approvals and policy revisions, in that order.
type SideRecords = (Vec<SideRecord>, Vec<SideRecord>, Vec<SideRecord>);

fn side_records(
    c: &ControlSide,
    opts: &ExportOptions,
    incident: Option<SideRecord>,
    selected: &[&Row],
) -> Result<SideRecords, ControlError> {
    let tenant = |rec: &SideRecord| tenant_matches(rec, &opts.tenant);
    let text_is = |rec: &SideRecord, col: &str, want: &Option<String>| {
        want.as_ref()
            .is_none_or(|w| rec.fields.get(col).and_then(Value::as_str) == Some(w.as_str()))
    };
    let in_range = |t: Option<i64>| {
        t.is_some_and(|t| opts.since.is_none_or(|s| t >= s) && opts.until.is_none_or(|u| t < u))
    };
    let int = |rec: &SideRecord, col: &str| rec.fields.get(col).and_then(Value::as_i64);
    let secs_to_ns = |s: Option<i64>| s.map(|s| s.saturating_mul(1_000_000_000));

    let min = opts
        .min_severity
        .as_deref()
        .and_then(|s| s.parse::<Severity>().ok());
    let incidents: Vec<SideRecord> = match incident {
        Some(i) => vec![i],
        None => c
            .incidents()?
            .into_iter()
            .filter(|r| tenant(r) && text_is(r, "agent", &opts.agent))
            .filter(|r| in_range(int(r, "decided_at_ns")))
            .collect(),
    };
    let incidents = incidents
        .into_iter()
        .filter(|r| {
            let rank = r
                .fields
                .get("severity")
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<Severity>().ok());
            min.is_none_or(|m| rank.is_some_and(|r| r >= m))
        })
        .collect();

    let decision_ids: BTreeSet<&str> = selected
        .iter()
        .map(|r| r.record.decision_id.as_str())
        .collect();
    let approval_ids: BTreeSet<&str> = selected
        .iter()
        .map(|r| r.record.approval_id.as_str())
        .collect();
    let approvals = c
        .approvals()?
        .into_iter()
        .filter(|r| tenant(r) && text_is(r, "agent", &opts.agent))
        .filter(|r| {
            if opts.incident.is_some() {
                let linked = |col: &str, set: &BTreeSet<&str>| {
                    r.fields
                        .get(col)
                        .and_then(Value::as_str)
                        .is_some_and(|v| !v.is_empty() && set.contains(v))
                };
                linked("decision_id", &decision_ids) || linked("id", &approval_ids)
            } else {
                in_range(secs_to_ns(int(r, "created_at")))
            }
        })
        .collect();
    let revisions = c
        .revisions()?
        .into_iter()
        .filter(|r| in_range(secs_to_ns(int(r, "at"))))
        .collect();
    Ok((incidents, approvals, revisions))
}

/// The control store an export reads its side records from, through the store's trait
/// (the embedded SQLite file, read-only, or the PostgreSQL the replicas share).
struct ControlSide {
    store: Arc<dyn ControlStore>,
    /// The file or the URL (its password hidden), for messages.
    shown: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl ControlSide {
    /// The store `opts` names; `None` when none was named and the data directory has
    /// no `control.db` (a sidecar's).
    fn open(data_dir: &Path, opts: &ExportOptions) -> Result<Option<Self>, ExportError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ExportError::Invalid(format!("cannot start a runtime: {e}")))?;
        let (store, shown): (Arc<dyn ControlStore>, PathBuf) = match &opts.control_database_url {
            Some(url) => match ControlDatabase::parse(url)
                .map_err(|e| ExportError::Invalid(format!("--control-database-url {e}")))?
            {
                ControlDatabase::Postgres(url) => {
                    let shown = PathBuf::from(crate::config::redact_url(&url));
                    let store = runtime
                        .block_on(crate::control::postgres::PostgresStore::open_read_only(
                            &url,
                        ))
                        .map_err(|e| ExportError::Read {
                            path: shown.clone(),
                            message: e.to_string(),
                        })?;
                    (Arc::new(store), shown)
                }
                ControlDatabase::Sqlite(path) => (Arc::new(read_only_sqlite(&path)?), path),
            },
            None => {
                let path = opts
                    .control_db
                    .clone()
                    .unwrap_or_else(|| data_dir.join(CONTROL_DB_FILE));
                // A control database named explicitly must be there; the default one
                // is optional.
                if opts.control_db.is_none() && !path.exists() {
                    return Ok(None);
                }
                (Arc::new(read_only_sqlite(&path)?), path)
            }
        };
        Ok(Some(Self {
            store,
            shown,
            runtime,
        }))
    }

    fn read<T: Send + 'static>(
        &self,
        work: impl Fn(&mut dyn Txn) -> Result<T, ControlError> + Send + Sync + 'static,
    ) -> Result<T, ControlError> {
        self.runtime.block_on(self.store.run(work))
    }

    /// Every incident, oldest first.
    fn incidents(&self) -> Result<Vec<SideRecord>, ControlError> {
        let all = self.read(|tx| tx.incidents(None, None, None))?;
        Ok(all.iter().map(incident_record).collect())
    }

    /// Every approval as stored, oldest first.
    fn approvals(&self) -> Result<Vec<SideRecord>, ControlError> {
        let all = self.read(|tx| tx.approvals(None, None))?;
        Ok(all.iter().map(approval_record).collect())
    }

    /// Every policy activation, oldest first.
    fn revisions(&self) -> Result<Vec<SideRecord>, ControlError> {
        let mut all = self.read(|tx| tx.revisions(u32::MAX))?;
        all.reverse();
        Ok(all.iter().map(revision_record).collect())
    }
}

fn read_only_sqlite(path: &Path) -> Result<crate::control::sqlite::SqliteStore, ExportError> {
    crate::control::sqlite::SqliteStore::open_read_only(path).map_err(|e| ExportError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A record's fields as a bundle carries them (the columns of [`Table::columns_for`]'s
/// tables, under their stored names).
fn side(fields: Vec<(&str, Value)>) -> SideRecord {
    SideRecord {
        fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        redacted: Vec::new(),
    }
}

fn incident_record(i: &records::Incident) -> SideRecord {
    side(vec![
        ("id", i.id.clone().into()),
        ("tenant", i.tenant.clone().into()),
        ("agent", i.agent.clone().into()),
        ("session", i.session.clone().into()),
        ("run_id", i.run_id.clone().into()),
        ("kind", i.kind.clone().into()),
        ("severity", i.severity.as_str().into()),
        ("summary", i.summary.clone().into()),
        ("evidence", i.evidence.clone().into()),
        ("trigger_decision", i.trigger_decision.clone().into()),
        ("decided_at_ns", i.decided_at_ns.into()),
        ("status", i.status.as_str().into()),
        ("created_at_ns", i.created_at_ns.into()),
        ("updated_at", i.updated_at.into()),
        ("acknowledged_by", i.acknowledged_by.clone().into()),
        ("closed_by", i.closed_by.clone().into()),
        ("close_reason", i.close_reason.clone().into()),
        ("actions", i.actions.clone().into()),
        ("autonomy_level", i.autonomy_level.into()),
        ("reported_by", i.reported_by.clone().into()),
        ("policy_revision", i.policy_revision.clone().into()),
    ])
}

fn approval_record(a: &records::Approval) -> SideRecord {
    side(vec![
        ("id", a.id.clone().into()),
        ("tenant", a.tenant.clone().into()),
        ("agent", a.agent.clone().into()),
        ("session", a.session.clone().into()),
        ("run_id", a.run_id.clone().into()),
        ("tool", a.tool.clone().into()),
        ("action", a.action.clone().into()),
        ("resource", a.resource.clone().into()),
        ("arguments", a.arguments.clone().into()),
        ("call_hash", a.call_hash.clone().into()),
        ("policy_reason", a.policy_reason.clone().into()),
        ("decision_id", a.decision_id.clone().into()),
        ("status", a.status.as_str().into()),
        ("created_at", a.created_at.into()),
        ("expires_at", a.expires_at.into()),
        ("decided_by", a.decided_by.clone().into()),
        ("decided_at", a.decided_at.into()),
        ("decision_reason", a.decision_reason.clone().into()),
        ("override_expires_at", a.override_expires_at.into()),
        ("used_at", a.used_at.into()),
        ("used_by_decision", a.used_by_decision.clone().into()),
    ])
}

fn revision_record(r: &records::Revision) -> SideRecord {
    side(vec![
        ("id", r.id.into()),
        ("revision", r.revision.clone().into()),
        ("digest", r.digest.clone().into()),
        ("action", r.action.clone().into()),
        ("actor", r.actor.clone().into()),
        ("reason", r.reason.clone().into()),
        ("at", r.activated_at.into()),
    ])
}

fn collect_strings(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) if !s.is_empty() => {
            out.insert(s.clone());
        }
        Value::Array(a) => a.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(o) => o.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

/// The redacted values, searched for in every disclosed text in one pass each.
pub(super) struct Secrets {
    /// Values shorter than [`MIN_SUBSTRING`]: only a field equal to one is removed.
    short: BTreeSet<String>,
    /// The others, found anywhere inside a text.
    long: Option<aho_corasick::AhoCorasick>,
}

impl Secrets {
    pub(super) fn new(values: BTreeSet<String>) -> Result<Self, ExportError> {
        let (long, short): (Vec<String>, Vec<String>) = values
            .into_iter()
            .partition(|s| s.chars().count() >= MIN_SUBSTRING);
        let long = if long.is_empty() {
            None
        } else {
            Some(aho_corasick::AhoCorasick::new(&long).map_err(|e| {
                ExportError::Refused(format!(
                    "cannot search for the {} redacted values: {e}; export a narrower range",
                    long.len()
                ))
            })?)
        };
        Ok(Self {
            short: short.into_iter().collect(),
            long,
        })
    }

    /// `text` contains one of the redacted values.
    fn found_in(&self, text: &str) -> bool {
        self.short.contains(text) || self.long.as_ref().is_some_and(|ac| ac.is_match(text))
    }

    fn found_in_value(&self, v: &Value) -> bool {
        match v {
            Value::String(s) => self.found_in(s),
            Value::Array(a) => a.iter().any(|v| self.found_in_value(v)),
            Value::Object(o) => o.values().any(|v| self.found_in_value(v)),
            _ => false,
        }
    }
}

/// One row as the bundle shows it.
pub(super) fn bundle_row(
    r: &Row,
    selected: bool,
    redact: &BTreeSet<&str>,
    secrets: &Secrets,
) -> BundleRow {
    let json = |v: FieldValue<'_>| match v {
        FieldValue::Int(n) => Value::from(n),
        FieldValue::Text(t) => Value::from(t),
    };
    let mut fields = BTreeMap::new();
    match &r.salt {
        None => {
            // Format 1: only ever exported whole (see `check_v1`).
            for (name, v) in r.record.fields() {
                let field = BundleField {
                    value: Some(json(v)),
                    ..Default::default()
                };
                fields.insert(name.to_owned(), field);
            }
        }
        Some(salt) => {
            for (name, v) in r.record.fields() {
                let field_salt = super::field_salt(salt, name);
                let hidden = !selected
                    || redact.contains(name)
                    || (!PROTECTED_FIELDS.contains(&name)
                        && matches!(v, FieldValue::Text(t) if secrets.found_in(t)));
                let field = if hidden {
                    BundleField {
                        commitment: Some(crate::hex(&super::field_commitment(
                            &field_salt,
                            name,
                            v,
                        ))),
                        ..Default::default()
                    }
                } else {
                    BundleField {
                        value: Some(json(v)),
                        salt: Some(crate::hex(&field_salt)),
                        commitment: None,
                    }
                };
                fields.insert(name.to_owned(), field);
            }
        }
    }
    debug_assert_eq!(fields.len(), FIELD_NAMES.len());
    BundleRow {
        inclusion: None,
        seq: r.seq,
        format: if r.salt.is_some() { 2 } else { 1 },
        key_id: r.key_id.clone(),
        prev_hash: crate::hex(&r.prev),
        hash: crate::hex(&r.hash),
        selected,
        fields,
    }
}
