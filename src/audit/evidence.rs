//! Checks an incident's evidence against the exported log of the data plane that reported
//! it (`aegis audit check-evidence`).
//!
//! A sidecar reports an incident with, for each decision, the sequence number and hash of
//! the audit row it wrote and signed for it; the control plane cannot read that log and
//! stores them as given. Later, the sidecar's log is exported (`aegis audit export` on its
//! data directory) and this check holds each decision to it: the row at that sequence
//! number must be in the bundle, have that hash, and disclose that decision id and the
//! incident's tenant. The bundle itself must verify ([`super::bundle::verify`]), pinned to
//! the sidecar's audit key, or the check proves nothing.

use serde::Deserialize;

use super::bundle::Bundle;

/// The parts of an incident (as `aegis ctl --json incidents show` prints it) checked.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Incident {
    /// The incident's id.
    pub id: String,
    /// The tenant it was raised in; every row named must disclose this tenant.
    pub tenant: String,
    /// The sidecar (or operator) that reported it.
    pub reported_by: String,
    /// The decision ids of the evidence, oldest first.
    pub evidence: Vec<String>,
    /// Those decisions with the rows they name.
    pub decisions: Vec<EvidenceRow>,
}

/// One decision of the evidence with the row it names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct EvidenceRow {
    /// The decision's id, as its row must disclose.
    pub decision_id: String,
    /// The hash the reporter gave for the row, hex.
    pub row_hash: String,
    /// The sequence number the reporter gave for the row.
    pub audit_seq: u64,
}

/// Every way the incident's evidence disagrees with the bundle's rows, each naming the
/// decision; empty if every decision is the row it claims. (The bundle's own integrity is
/// [`super::bundle::verify`]'s.)
pub fn check(bundle: &Bundle, incident: &Incident) -> Vec<String> {
    let mut problems = Vec::new();
    if incident.decisions.is_empty() {
        problems.push(format!(
            "incident {}: its evidence names no decision with an audit row (reported \
             before row hashes were required?)",
            incident.id
        ));
    }
    for id in &incident.evidence {
        if !incident.decisions.iter().any(|d| &d.decision_id == id) {
            problems.push(format!(
                "decision {id}: in the evidence without its audit row"
            ));
        }
    }
    for d in &incident.decisions {
        let id = &d.decision_id;
        let Some(row) = bundle.rows.iter().find(|r| r.seq == d.audit_seq) else {
            problems.push(format!(
                "decision {id}: row {} is not in the bundle (export the reporting data \
                 plane's log over it)",
                d.audit_seq
            ));
            continue;
        };
        if row.hash != d.row_hash {
            problems.push(format!(
                "decision {id}: row {} has hash {}, the incident names {}: not the row the \
                 data plane signed",
                row.seq, row.hash, d.row_hash
            ));
        }
        match row.text("decision_id") {
            Some(found) if found == id => {}
            Some(found) => problems.push(format!(
                "decision {id}: row {} records decision {found}",
                row.seq
            )),
            None => problems.push(format!(
                "decision {id}: row {} does not disclose its decision id (export the \
                 incident's tenant without redacting it)",
                row.seq
            )),
        }
        match row.text("tenant") {
            Some(t) if t == incident.tenant => {}
            other => problems.push(format!(
                "decision {id}: row {} is of tenant {}, the incident of {}",
                row.seq,
                other.unwrap_or("(undisclosed)"),
                incident.tenant
            )),
        }
    }
    problems
}
