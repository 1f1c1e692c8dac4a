//! Incident notifications: webhooks fed from a durable outbox.
//!
//! When the control plane stores an incident it also stores, in the same transaction, one
//! outbox row per webhook that wants it (by tenant and least severity). A delivery task
//! posts due rows; a 2xx answer marks a row delivered, anything else (refused connection,
//! timeout, non-2xx) schedules a retry with exponential backoff and jitter, up to
//! `max_attempts`, after which the row stays in the outbox as `failed` and is logged. A
//! control plane stopped with rows pending delivers them when it starts again: nothing is
//! lost across a restart, and a receiver that is down gets the notification when it is back.
//!
//! Delivery is at least once: a receiver that answered after the time limit may see a
//! notification twice. Each payload carries the incident id to deduplicate on.

use std::sync::Arc;
use std::time::Duration;

use super::pb;
use super::store::ControlStore;
use crate::config::{NotifyConfig, WebhookConfig};
use crate::endpoint::Endpoint;
use crate::types::Severity;

/// Rows taken per round.
const BATCH: usize = 16;
/// How long past its turn's time limit a notification stays claimed by the replica that
/// took it (another replica sends it after that, if the first never recorded the attempt;
/// clocks of replicas more than this apart could send one twice).
const CLAIM_MARGIN_MS: i64 = 30_000;
/// Longest sleep between looks at the outbox (new rows also wake the task at once).
const IDLE: Duration = Duration::from_secs(1);
/// Delivered and failed notifications are kept this long (for `incidents show`), then pruned.
const KEEP_FINISHED_MS: i64 = 7 * 24 * 3600 * 1000;
/// How often finished notifications are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Most of a receiver's answer read (the status line is what matters).
const MAX_ERROR_BODY: usize = 512;

/// Most characters a notification keeps of an id-like field (tenant, agent, run id,
/// policy revision, an evidence item, a response action).
pub const MAX_ID_CHARS: usize = 128;
/// Most characters a notification keeps of an incident's summary.
pub const MAX_SUMMARY_CHARS: usize = 1000;
/// Most evidence items or response actions a notification lists.
pub const MAX_ITEMS: usize = 10;
/// Slack's limits on a header block's text, a section's text and a section field's.
const SLACK_HEADER_CHARS: usize = 150;
const SLACK_SECTION_CHARS: usize = 3000;
const SLACK_FIELD_CHARS: usize = 2000;

/// `s` whole if it has at most `max` characters, else its first `max` and a mark saying
/// it was cut and how long it was: an agent chooses run ids and tool names, and a 20,000
/// character one must neither flood a channel nor make Slack refuse the message.
fn cut(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_owned();
    }
    let kept: String = s.chars().take(max).collect();
    format!("{kept}… [cut: {n} characters]")
}

/// Escaped mrkdwn cut to Slack's `limit` for a block (escaping may have made it up to five
/// times longer than [`capped`] left it), never inside an `&…;` entity, marked when cut.
fn fit(text: String, limit: usize) -> String {
    const MARK: &str = "… [cut]";
    if text.chars().count() <= limit {
        return text;
    }
    let mut kept: String = text.chars().take(limit - MARK.chars().count()).collect();
    if let Some(amp) = kept.rfind('&')
        && !kept[amp..].contains(';')
    {
        kept.truncate(amp);
    }
    kept + MARK
}

/// At most [`MAX_ITEMS`] items, each [`cut`]; the rest counted.
fn cut_list(items: &[String]) -> Vec<String> {
    let mut out: Vec<String> = items
        .iter()
        .take(MAX_ITEMS)
        .map(|e| cut(e, MAX_ID_CHARS))
        .collect();
    if items.len() > MAX_ITEMS {
        out.push(format!("… and {} more", items.len() - MAX_ITEMS));
    }
    out
}

/// The incident as notifications carry it: every text field capped and marked when cut
/// (the stored incident keeps them whole).
pub fn capped(i: &pb::Incident) -> pb::Incident {
    pb::Incident {
        id: cut(&i.id, MAX_ID_CHARS),
        tenant: cut(&i.tenant, MAX_ID_CHARS),
        agent: cut(&i.agent, MAX_ID_CHARS),
        session: cut(&i.session, MAX_ID_CHARS),
        run_id: cut(&i.run_id, MAX_ID_CHARS),
        kind: cut(&i.kind, MAX_ID_CHARS),
        severity: cut(&i.severity, MAX_ID_CHARS),
        summary: cut(&i.summary, MAX_SUMMARY_CHARS),
        evidence: cut_list(&i.evidence),
        policy_revision: cut(&i.policy_revision, MAX_ID_CHARS),
        actions: cut_list(&i.actions),
        trigger_decision: cut(&i.trigger_decision, MAX_ID_CHARS),
        acknowledged_by: cut(&i.acknowledged_by, MAX_ID_CHARS),
        closed_by: cut(&i.closed_by, MAX_ID_CHARS),
        close_reason: cut(&i.close_reason, MAX_SUMMARY_CHARS),
        reported_by: cut(&i.reported_by, MAX_ID_CHARS),
        // The decisions behind it carry agent-chosen tools, reasons and run ids: the
        // first MAX_ITEMS, each field cut (the evidence ids list says how many there are).
        decisions: i
            .decisions
            .iter()
            .take(MAX_ITEMS)
            .map(|d| pb::EvidenceDecision {
                decision_id: cut(&d.decision_id, MAX_ID_CHARS),
                tool: cut(&d.tool, MAX_ID_CHARS),
                action: cut(&d.action, MAX_ID_CHARS),
                decision: cut(&d.decision, MAX_ID_CHARS),
                reason: cut(&d.reason, MAX_ID_CHARS),
                trust_level: cut(&d.trust_level, MAX_ID_CHARS),
                session: cut(&d.session, MAX_ID_CHARS),
                run_id: cut(&d.run_id, MAX_ID_CHARS),
                row_hash: cut(&d.row_hash, MAX_ID_CHARS),
                ..d.clone()
            })
            .collect(),
        ..i.clone()
    }
}

/// The outbox rows an incident makes: one per matching webhook.
pub fn notifications(incident: &pb::Incident, hooks: &[WebhookConfig]) -> Vec<(String, String)> {
    // An unknown severity counts as the lowest: only `min_severity = "low"` hooks get it.
    let severity = incident.severity.parse().unwrap_or(Severity::Low);
    hooks
        .iter()
        .filter(|h| h.tenant == "*" || h.tenant == incident.tenant)
        .filter(|h| {
            h.min_severity
                .parse::<Severity>()
                .is_ok_and(|m| severity >= m)
        })
        .map(|h| {
            let body = if h.format == "json" {
                serde_json::json!({ "event": "incident.raised", "incident": capped(incident) })
            } else {
                slack(incident)
            };
            (h.url.clone(), body.to_string())
        })
        .collect()
}

/// Text for Slack's mrkdwn: `&`, `<`, `>` escaped (so a tool name cannot ping
/// `<!channel>` or plant a link) and control characters dropped.
fn mrkdwn(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A Slack incoming-webhook message (`text` as the fallback, `blocks` for the layout).
/// Every value from an incident is capped ([`capped`]) and escaped: summaries carry tool
/// names the agent chose.
pub fn slack(i: &pb::Incident) -> serde_json::Value {
    let i = &capped(i);
    let i = &pb::Incident {
        id: mrkdwn(&i.id),
        tenant: mrkdwn(&i.tenant),
        agent: mrkdwn(&i.agent),
        run_id: mrkdwn(&i.run_id),
        kind: mrkdwn(&i.kind),
        severity: mrkdwn(&i.severity),
        summary: mrkdwn(&i.summary),
        evidence: i.evidence.iter().map(|e| mrkdwn(e)).collect(),
        policy_revision: mrkdwn(&i.policy_revision),
        autonomy_level: i.autonomy_level,
        actions: i.actions.iter().map(|e| mrkdwn(e)).collect(),
        ..Default::default()
    };
    let icon = match i.severity.parse() {
        Ok(Severity::Critical) => ":rotating_light:",
        Ok(Severity::High) => ":warning:",
        _ => ":information_source:",
    };
    let text = fit(
        format!(
            "{icon} [{}] {} {} for {}/{}: {}",
            i.severity.to_uppercase(),
            i.id,
            i.kind,
            i.tenant,
            i.agent,
            i.summary
        ),
        SLACK_SECTION_CHARS,
    );
    let field = |name: &str, value: &str| serde_json::json!({ "type": "mrkdwn", "text": fit(format!("*{name}*\n{value}"), SLACK_FIELD_CHARS) });
    let evidence = if i.evidence.is_empty() {
        "-".to_owned()
    } else {
        i.evidence.join(", ")
    };
    serde_json::json!({
        "text": text,
        "blocks": [
            {
                "type": "header",
                "text": { "type": "plain_text", "text": fit(format!("{} {} ({})", i.id, i.kind, i.severity), SLACK_HEADER_CHARS) }
            },
            { "type": "section", "text": { "type": "mrkdwn", "text": fit(i.summary.clone(), SLACK_SECTION_CHARS) } },
            {
                "type": "section",
                "fields": [
                    field("Tenant", &i.tenant),
                    field("Agent", &i.agent),
                    field("Run", if i.run_id.is_empty() { "-" } else { &i.run_id }),
                    field("Autonomy", &format!("L{}", i.autonomy_level)),
                    field("Evidence", &evidence),
                    field("Policy", &i.policy_revision),
                    field("Response", &if i.actions.is_empty() { "-".to_owned() } else { i.actions.join("; ") }),
                ]
            },
            {
                "type": "context",
                "elements": [
                    { "type": "mrkdwn", "text": format!("aegis ctl incidents show {} --tenant {}", i.id, i.tenant) }
                ]
            }
        ]
    })
}

/// Retry delay after `attempts` failed attempts: `initial * 2^(attempts-1)`, at most
/// `max`, then scaled by a random factor in [0.5, 1] so receivers coming back are not hit
/// by every control plane at once.
pub fn backoff(attempts: u32, initial_ms: u64, max_ms: u64) -> u64 {
    let exp = attempts.saturating_sub(1).min(30);
    let base = initial_ms.saturating_mul(1u64 << exp).min(max_ms);
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u64::from(u16::from_be_bytes(b))
    } else {
        u64::from(u16::MAX)
    };
    base / 2 + (base / 2) * r / u64::from(u16::MAX)
}

/// Counts of the delivery task, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Notifications the webhook accepted (2xx).
    pub delivered: std::sync::atomic::AtomicU64,
    /// Failed attempts that will be tried again.
    pub retried: std::sync::atomic::AtomicU64,
    /// Notifications given up after `notify.max_attempts`.
    pub failed: std::sync::atomic::AtomicU64,
}

/// The TLS client settings of https webhooks: the Mozilla roots (webpki-roots), plus the
/// PEM certificates of `ca_file` (a private CA, a TLS-inspecting egress proxy).
pub fn tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let named = |e: &dyn std::fmt::Display| format!("notify.ca_file {}: {e}", path.display());
        let mut added = 0;
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(path).map_err(|e| named(&e))? {
            let cert = cert.map_err(|e| named(&e))?;
            roots.add(cert).map_err(|e| named(&e))?;
            added += 1;
        }
        if added == 0 {
            return Err(named(&"no PEM certificate in it"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The delivery task's handle: wake it when rows were added.
#[derive(Debug)]
pub struct Notifier {
    /// Wakes the delivery task early (new rows in the outbox).
    pub wake: tokio::sync::Notify,
    /// What the delivery task has done, for `/metrics`.
    pub counters: Counters,
}

impl Notifier {
    /// Starts the delivery task; it ends when `shutdown` turns true.
    pub fn start(
        store: Arc<dyn ControlStore>,
        config: NotifyConfig,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(Arc<Self>, tokio::task::JoinHandle<()>), String> {
        let tls = tls_config(config.ca_file.as_deref())?;
        let me = Arc::new(Self {
            wake: tokio::sync::Notify::new(),
            counters: Counters::default(),
        });
        let task = tokio::spawn(run(me.clone(), store, config, tls, shutdown));
        Ok((me, task))
    }
}

fn now_ms() -> i64 {
    crate::unix_nanos() / 1_000_000
}

async fn run(
    me: Arc<Notifier>,
    store: Arc<dyn ControlStore>,
    config: NotifyConfig,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let timeout = Duration::from_millis(config.timeout_ms);
    let mut pruned_at: Option<tokio::time::Instant> = None;
    loop {
        if pruned_at.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            pruned_at = Some(tokio::time::Instant::now());
            let before = now_ms().saturating_sub(KEEP_FINISHED_MS);
            match store
                .run(move |tx| tx.delete_finished_notifications(before))
                .await
            {
                Ok(0) => {}
                Ok(n) => crate::log!(
                    info,
                    "notifications: pruned {n} finished rows older than 7 days"
                ),
                Err(e) => crate::log!(warn, "notifications: cannot prune the outbox: {e}"),
            }
        }
        let now = now_ms();
        let per_row = i64::try_from(config.timeout_ms).unwrap_or(i64::MAX);
        let due = match store
            .run(move |tx| {
                super::rules::claim_due_notifications(tx, now, BATCH, per_row, CLAIM_MARGIN_MS)
            })
            .await
        {
            Ok(d) => d,
            Err(e) => {
                crate::log!(error, "notifications: cannot read the outbox: {e}");
                Vec::new()
            }
        };
        for row in &due {
            let result = tokio::select! {
                r = tokio::time::timeout(timeout, post(&row.url, &row.payload, &tls)) => {
                    r.unwrap_or_else(|_| Err(format!("no answer within {} ms", config.timeout_ms)))
                }
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let attempts = row.attempts.saturating_add(1);
            let (delivered, next, error) = match result {
                Ok(()) => {
                    me.counters.delivered.fetch_add(1, Relaxed);
                    (true, None, String::new())
                }
                Err(e) if attempts >= config.max_attempts => {
                    me.counters.failed.fetch_add(1, Relaxed);
                    crate::log!(
                        error,
                        "notifications: gave up on incident {} to {} after {attempts} attempts: {e}",
                        row.incident,
                        host_of(&row.url)
                    );
                    (false, None, e)
                }
                Err(e) => {
                    me.counters.retried.fetch_add(1, Relaxed);
                    let wait = backoff(attempts, config.retry_initial_ms, config.retry_max_ms);
                    crate::log!(
                        warn,
                        "notifications: incident {} to {} failed (attempt {attempts}), retry in {wait} ms: {e}",
                        row.incident,
                        host_of(&row.url)
                    );
                    let wait = i64::try_from(wait).unwrap_or(i64::MAX);
                    (false, Some(now_ms().saturating_add(wait)), e)
                }
            };
            let (attempted, id, now) = (row.clone(), row.id, now_ms());
            let saved = store
                .run(move |tx| {
                    super::rules::notification_attempted(
                        tx, &attempted, delivered, next, &error, now,
                    )
                })
                .await;
            match saved {
                Ok(true) => {}
                Ok(false) => crate::log!(
                    warn,
                    "notifications: outbox row {id} was taken over by another replica before \
                     this attempt was recorded (its lease ended); the attempt is not recorded"
                ),
                Err(e) => crate::log!(
                    error,
                    "notifications: cannot record the attempt of outbox row {id}: {e}"
                ),
            }
        }
        if due.len() == BATCH {
            continue;
        }
        let next = store
            .run(|tx| tx.next_notification_at())
            .await
            .ok()
            .flatten();
        let sleep = next.map_or(IDLE, |at| {
            Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)).min(IDLE)
        });
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = me.wake.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// The host part of a URL, for logs (the path of a Slack webhook is its secret).
pub fn host_of(url: &str) -> String {
    Endpoint::parse(url).map_or_else(|_| "(bad url)".into(), |e| e.host)
}

/// One POST; Ok on a 2xx answer.
async fn post(
    url: &str,
    payload: &str,
    tls: &Arc<tokio_rustls::rustls::ClientConfig>,
) -> Result<(), String> {
    let ep = Endpoint::parse(url)?;
    let stream = tokio::net::TcpStream::connect(&ep.authority)
        .await
        .map_err(|e| format!("connect {}: {e}", ep.authority))?;
    if ep.tls {
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        let stream = connector
            .connect(ep.server_name()?, stream)
            .await
            .map_err(|e| format!("TLS with {}: {e}", ep.host))?;
        exchange(stream, &ep, payload).await
    } else {
        exchange(stream, &ep, payload).await
    }
}

/// The HTTP/1.1 request and answer over an open connection.
async fn exchange<S>(stream: S, ep: &Endpoint, payload: &str) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Full};
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::post(ep.path.as_str())
        .header(hyper::header::HOST, ep.host.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "aegis-notify")
        .body(Full::new(bytes::Bytes::copy_from_slice(payload.as_bytes())))
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    let result = if status.is_success() {
        Ok(())
    } else {
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let shown = body.get(..MAX_ERROR_BODY).unwrap_or(&body);
        let text = String::from_utf8_lossy(shown).into_owned();
        Err(format!("answered {status}: {}", text.trim()))
    };
    conn.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://127.0.0.1:8080/hooks/x?y=1").unwrap();
        assert_eq!(e.authority, "127.0.0.1:8080");
        assert_eq!(e.path, "/hooks/x?y=1");
        assert_eq!(
            Endpoint::parse("http://relay").unwrap().authority,
            "relay:80"
        );
        let slack = Endpoint::parse("https://hooks.slack.com/services/T/B/secret").unwrap();
        assert_eq!(
            (slack.authority.as_str(), slack.tls),
            ("hooks.slack.com:443", true)
        );
        assert!(slack.server_name().is_ok());
        let err = Endpoint::parse("ftp://hooks/secret").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("http:///x").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        for attempts in 1..40 {
            let b = backoff(attempts, 100, 10_000);
            let base = (100u64 << (attempts - 1).min(30)).min(10_000);
            assert!(b >= base / 2 && b <= base, "{attempts}: {b} vs {base}");
        }
    }

    #[test]
    fn webhooks_by_tenant_and_severity() {
        let hook = |tenant: &str, min: &str| WebhookConfig {
            tenant: tenant.into(),
            url: format!("http://h/{tenant}/{min}"),
            min_severity: min.into(),
            format: "slack".into(),
        };
        let hooks = [
            hook("acme", "high"),
            hook("*", "low"),
            hook("globex", "low"),
        ];
        let incident = pb::Incident {
            id: "INC-1".into(),
            tenant: "acme".into(),
            severity: "medium".into(),
            ..Default::default()
        };
        let urls: Vec<_> = notifications(&incident, &hooks)
            .into_iter()
            .map(|(u, _)| u)
            .collect();
        assert_eq!(urls, vec!["http://h/*/low"]);
        let critical = pb::Incident {
            severity: "critical".into(),
            ..incident
        };
        let sent = notifications(&critical, &hooks);
        assert_eq!(sent.len(), 2);
        let hostile = pb::Incident {
            summary: "called <!channel> <https://evil|approve here> & \u{1b}[2J".into(),
            ..critical.clone()
        };
        let text = slack(&hostile).to_string();
        assert!(
            !text.contains("<!channel>") && !text.contains("<https"),
            "{text}"
        );
        assert!(
            text.contains("&lt;!channel&gt;") && !text.contains("\\u001b"),
            "{text}"
        );
        let body: serde_json::Value = serde_json::from_str(&sent[0].1).unwrap();
        assert!(body["text"].as_str().unwrap().contains("INC-1"));
        assert_eq!(body["blocks"][0]["type"], "header");
    }

    #[test]
    fn every_field_is_capped_and_marked_when_cut() {
        let flood = pb::Incident {
            id: "INC-1".into(),
            tenant: "acme".into(),
            agent: "bot".into(),
            kind: "deny_storm".into(),
            severity: "high".into(),
            run_id: "r".repeat(20_006),
            summary: "<".repeat(50_000),
            evidence: (0..500).map(|i| format!("d-{i}")).collect(),
            actions: vec!["x".repeat(5_000)],
            decisions: (0..1024)
                .map(|i| pb::EvidenceDecision {
                    decision_id: format!("d-{i}"),
                    tool: "t".repeat(1024),
                    reason: "why".repeat(300),
                    run_id: "r".repeat(1024),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let c = capped(&flood);
        assert_eq!(
            c.run_id,
            format!("{}… [cut: 20006 characters]", "r".repeat(MAX_ID_CHARS))
        );
        assert!(c.summary.ends_with("… [cut: 50000 characters]"));
        assert_eq!(c.evidence.len(), MAX_ITEMS + 1);
        assert_eq!(c.evidence[MAX_ITEMS], "… and 490 more");
        assert!(c.actions[0].ends_with("… [cut: 5000 characters]"));
        assert_eq!(c.decisions.len(), MAX_ITEMS);
        assert!(c.decisions[0].run_id.ends_with("… [cut: 1024 characters]"));
        // Short fields are untouched, unmarked.
        assert_eq!((c.agent.as_str(), c.evidence[0].as_str()), ("bot", "d-0"));

        // Slack: within Slack's block limits (header 150, section 3000, field 2000), and
        // the whole message bounded.
        let v = slack(&flood);
        let header = v["blocks"][0]["text"]["text"].as_str().unwrap();
        assert!(header.chars().count() <= 150, "{header}");
        let section = v["blocks"][1]["text"]["text"].as_str().unwrap();
        assert!(section.chars().count() <= 3000, "{}", section.len());
        assert!(
            section.ends_with("&lt;… [cut]"),
            "no half entity: {section}"
        );
        for f in v["blocks"][2]["fields"].as_array().unwrap() {
            let t = f["text"].as_str().unwrap();
            assert!(t.chars().count() <= 2000, "{t}");
        }
        let run = &v["blocks"][2]["fields"][2]["text"];
        assert!(
            run.as_str().unwrap().contains("[cut: 20006 characters]"),
            "{run}"
        );
        assert!(v.to_string().len() < 16 * 1024, "{}", v.to_string().len());
        // The JSON format carries the capped incident too.
        let hooks = [WebhookConfig {
            tenant: "*".into(),
            url: "http://h/".into(),
            min_severity: "low".into(),
            format: "json".into(),
        }];
        let (_, body) = &notifications(&flood, &hooks)[0];
        assert!(body.len() < 16 * 1024, "{}", body.len());
        assert!(body.contains("[cut: 20006 characters]"));
    }
}
