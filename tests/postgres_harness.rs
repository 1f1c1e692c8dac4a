//! The PostgreSQL test harness (tests/common/pg.rs) itself: a real server starts on
//! loopback, serves a fresh database, keeps its data across a restart, runs beside
//! another, and is gone once dropped.

mod common;

use std::path::Path;

use common::pg::{Postgres, psql};

/// The postmaster's pid, read by the server from its own `postmaster.pid` (first line).
fn postmaster_pid(url: &str) -> u32 {
    let file = psql(url, "select pg_read_file('postmaster.pid')");
    file.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in postmaster.pid: {file:?}"))
}

#[test]
fn a_server_starts_and_serves_a_fresh_database() {
    let pg = Postgres::start();
    let url = pg.database("harness");
    assert_eq!(
        url,
        format!("postgres://aegis@127.0.0.1:{}/harness", pg.port())
    );
    assert_eq!(psql(&url, "select 1"), "1");
    assert_eq!(psql(&url, "select current_user"), "aegis");
    assert_eq!(psql(&url, "select current_database()"), "harness");
    // Loopback only, and durable commits.
    assert_eq!(psql(&url, "show listen_addresses"), "127.0.0.1");
    assert_eq!(psql(&url, "show fsync"), "on");
    assert_eq!(psql(&url, "show port"), pg.port().to_string());
}

#[test]
fn a_restart_keeps_what_was_committed_before_it() {
    let pg = Postgres::start();
    let url = pg.database("restart");
    psql(
        &url,
        "create table marks (v text); insert into marks values ('before')",
    );
    let started = psql(&url, "select pg_postmaster_start_time()");
    let pid = postmaster_pid(&url);

    pg.restart();

    assert_ne!(
        psql(&url, "select pg_postmaster_start_time()"),
        started,
        "the server did not restart"
    );
    assert_ne!(postmaster_pid(&url), pid, "the same postmaster");
    assert_eq!(psql(&url, "select v from marks"), "before");
    psql(&url, "insert into marks values ('after')");
    assert_eq!(psql(&url, "select count(*) from marks"), "2");
}

#[test]
fn two_servers_run_at_once_on_different_ports() {
    let a = Postgres::start();
    let b = Postgres::start();
    assert_ne!(a.port(), b.port());
    let (ua, ub) = (a.database("same"), b.database("same"));
    psql(&ua, "create table t (v text); insert into t values ('a')");
    psql(&ub, "create table t (v text); insert into t values ('b')");
    assert_eq!(psql(&ua, "select v from t"), "a");
    assert_eq!(psql(&ub, "select v from t"), "b");
    assert_ne!(postmaster_pid(&ua), postmaster_pid(&ub));
}

#[test]
fn dropping_the_server_stops_its_process() {
    let pg = Postgres::start();
    let url = pg.database("dropped");
    let pid = postmaster_pid(&url);
    let proc = format!("/proc/{pid}");
    assert!(Path::new(&proc).exists(), "{proc} missing while running");
    let port = pg.port();

    drop(pg);

    assert!(
        !Path::new(&proc).exists(),
        "the postmaster {pid} still runs"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts connections"
    );
}
