//! A real PostgreSQL server for tests: Debian's binaries (`scripts/test` installs the
//! `postgresql` package), a cluster of its own in a temp dir, listening on 127.0.0.1 and a
//! free port with its Unix socket in the temp dir; no system-wide service is used.
//!
//! initdb takes seconds (about 2.7 s on the development machine), so it runs once per
//! PostgreSQL version into a template under the target dir (`CARGO_TARGET_TMPDIR`),
//! guarded by a lock file against test binaries running in parallel; each server starts
//! from a copy of it. initdb and postgres refuse to run as root, and the tests run as root
//! (the storage-fault tests mount a tmpfs): as root, they run as Debian's `postgres`
//! system user, which owns the data and socket directories.
//!
//! Nothing here skips: without PostgreSQL the tests fail, naming what is missing.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a server may take to accept connections after it was started.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A PostgreSQL server of its own, in a temp dir, on 127.0.0.1 and a free port; stopped
/// (immediate) on drop.
pub struct Postgres {
    /// The temp dir: `data/` (the cluster), the Unix socket, `server.log`.
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The user the server runs as, when the tests run as root.
    owner: Option<Owner>,
    port: u16,
    /// The postmaster (postgres is spawned without a wrapper: this is its pid).
    server: Mutex<Child>,
}

/// The uid and gid of the `postgres` system user.
#[derive(Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl Postgres {
    /// initdb (trust auth on loopback only, superuser `aegis`) and start; panics naming
    /// what is missing (e.g. "PostgreSQL not found under /usr/lib/postgresql/*/bin:
    /// scripts/test installs it") -- never skips.
    pub fn start() -> Postgres {
        Self::start_with(|_, _| {})
    }

    /// [`Self::start`] with TLS only over TCP: `cert` and `key` (PEM) serve TLS, and
    /// pg_hba.conf admits TCP connections that use it and rejects the others.
    pub fn start_tls(cert: &Path, key: &Path) -> Postgres {
        Self::start_with(|dir, owner| {
            let data = dir.join("data");
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, data.join(to)).expect("copy the server's TLS files");
                std::fs::set_permissions(
                    data.join(to),
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .expect("chmod 600");
                if let Some(o) = owner {
                    chown(&data.join(to), o);
                }
            }
            let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))
                .expect("read postgresql.conf");
            conf.push_str(
                "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            );
            std::fs::write(data.join("postgresql.conf"), conf).expect("write postgresql.conf");
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
                 hostnossl all all 0.0.0.0/0 reject\n",
            )
            .expect("write pg_hba.conf");
        })
    }

    fn start_with(setup: impl Fn(&Path, Option<Owner>)) -> Postgres {
        let bin = bindir();
        let owner = owner();
        let template = template(&bin, owner);
        let dir = tempfile::Builder::new()
            .prefix("aegis-pg-")
            .tempdir()
            .expect("a temp dir for PostgreSQL");
        let data = dir.path().join("data");
        // `cp -a` keeps the template's owner (postgres) and modes (0700, which postgres
        // insists on for its data directory).
        run(Command::new("cp").arg("-a").arg(&template).arg(&data));
        if let Some(o) = owner {
            chown(dir.path(), o);
        }
        setup(dir.path(), owner);
        // A free port can be taken by another test between asking for it and the server's
        // bind: a lost race is tried again on another port.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut server = spawn(&bin, owner, dir.path(), port);
            match wait_ready(&bin, dir.path(), port, &mut server) {
                Ok(()) => {
                    return Postgres {
                        dir,
                        bin,
                        owner,
                        port,
                        server: Mutex::new(server),
                    };
                }
                Err(e) if e.contains("Address already in use") => {
                    stop(&mut server, libc::SIGQUIT);
                    last = e;
                }
                Err(e) => {
                    stop(&mut server, libc::SIGQUIT);
                    panic!("{e}");
                }
            }
        }
        panic!("PostgreSQL found no free port on 127.0.0.1 in five tries: {last}")
    }

    /// A fresh database on this server: its URL, `postgres://aegis@127.0.0.1:PORT/NAME`.
    pub fn database(&self, name: &str) -> String {
        run(Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-U", "aegis", "-p"])
            .arg(self.port.to_string())
            .arg(name));
        format!("postgres://aegis@127.0.0.1:{}/{name}", self.port)
    }

    /// A fresh database, also reached through a TCP front that can go silent
    /// ([`super::service::silent_front`]): (direct URL, URL through the front, the switch).
    pub async fn database_behind_silent_front(
        &self,
        name: &str,
    ) -> (
        String,
        String,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        let direct = self.database(name);
        let (front, silent) = super::service::silent_front(self.port).await;
        let through = direct.replace(&format!(":{}/", self.port), &format!(":{front}/"));
        (direct, through, silent)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast shutdown) and starts it again on the same port and data (a
    /// database restart under the control plane).
    pub fn restart(&self) {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        stop(&mut server, libc::SIGINT);
        *server = spawn(&self.bin, self.owner, self.dir.path(), self.port);
        if let Err(e) = wait_ready(&self.bin, self.dir.path(), self.port, &mut server) {
            panic!("{e}");
        }
    }
}

/// Polls `pg_isready` until the server on `port` accepts connections; the error says why
/// not, with the tail of the server's log (in `dir`).
fn wait_ready(bin: &Path, dir: &Path, port: u16, server: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = server.try_wait().ok().flatten() {
            return Err(format!(
                "PostgreSQL on port {port} exited ({status}) before it was ready; its log:\n{}",
                log_tail(dir)
            ));
        }
        let ready = Command::new(bin.join("pg_isready"))
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "aegis",
                "-d",
                "postgres",
                "-p",
            ])
            .arg(port.to_string())
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "PostgreSQL on port {port} not ready within {READY_WITHIN:?}; its log:\n{}",
                log_tail(dir)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last 40 lines of the server's log.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        stop(&mut server, libc::SIGQUIT);
    }
}

/// Signals the postmaster (SIGINT: fast shutdown, SIGQUIT: immediate) and waits for it;
/// SIGKILL after 20 s.
fn stop(server: &mut Child, signal: i32) {
    if server.try_wait().ok().flatten().is_some() {
        return;
    }
    if let Ok(pid) = i32::try_from(server.id()) {
        // SAFETY: kill(2) on our own child's pid, which wait() has not reaped yet.
        unsafe { libc::kill(pid, signal) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if server.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// The postmaster on `port`, its data in `dir/data`, its socket in `dir`, its log in
/// `dir/server.log` (appended, so a restart keeps the earlier log).
fn spawn(bin: &Path, owner: Option<Owner>, dir: &Path, port: u16) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .expect("open server.log");
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.display()))
        // Durability is under test: commits reach the disk.
        .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
        .args(["-c", "max_connections=40", "-c", "shared_buffers=16MB"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup server.log"))
        .stderr(log);
    as_owner(&mut cmd, owner);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("could not start {}: {e}", bin.join("postgres").display()))
}

/// The template cluster for this PostgreSQL version, made once under the target dir.
fn template(bin: &Path, owner: Option<Owner>) -> PathBuf {
    let version = bin
        .parent()
        .and_then(Path::file_name)
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pg".into());
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("create CARGO_TARGET_TMPDIR");
    let template = base.join(format!("postgres-template-{version}"));
    let done = base.join(format!("postgres-template-{version}.done"));
    // The lock is held while the template is checked and, if missing, made: a second
    // test binary waits here instead of running initdb into the same directory.
    let lock = File::create(base.join(format!("postgres-template-{version}.lock")))
        .expect("create the template's lock file");
    lock.lock().expect("lock the template's lock file");
    if done.exists() && template.is_dir() {
        return template;
    }
    let _ = std::fs::remove_dir_all(&template);
    // initdb runs in a scratch dir of its own in /tmp (readable by the postgres user,
    // unlike the target dir, perhaps), then the result is copied beside the lock.
    let scratch = tempfile::Builder::new()
        .prefix("aegis-pg-initdb-")
        .tempdir()
        .expect("a temp dir for initdb");
    if let Some(o) = owner {
        chown(scratch.path(), o);
    }
    let data = scratch.path().join("data");
    let mut cmd = Command::new(bin.join("initdb"));
    cmd.arg("-D")
        .arg(&data)
        .args(["-U", "aegis", "--auth-local=trust", "--auth-host=trust"])
        .args(["-E", "UTF8", "--no-locale", "--no-instructions"])
        // The template is only copied; each server's own writes are fsynced.
        .arg("--no-sync");
    as_owner(&mut cmd, owner);
    run(&mut cmd);
    run(Command::new("cp").arg("-a").arg(&data).arg(&template));
    std::fs::write(&done, "").expect("mark the template done");
    template
}

/// The directory of Debian's PostgreSQL binaries: `pg_config --bindir` when it names one
/// with a server in it, else the highest version under /usr/lib/postgresql.
fn bindir() -> PathBuf {
    let has_server = |p: &Path| p.join("postgres").is_file() && p.join("initdb").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&p) {
            return p;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, p)| has_server(p))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, p)) => p,
        None => panic!(
            "PostgreSQL not found under /usr/lib/postgresql/*/bin: scripts/test installs it \
             (apt-get install postgresql)"
        ),
    }
}

/// The `postgres` user, when running as root (initdb and postgres refuse root).
fn owner() -> Option<Owner> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "postgres"]).output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .expect("id prints a number"),
            _ => panic!(
                "running as root, PostgreSQL must run as the `postgres` system user, which \
                 does not exist: install Debian's postgresql package (scripts/test does)"
            ),
        }
    };
    Some(Owner {
        uid: id("-u"),
        gid: id("-g"),
    })
}

/// Runs `cmd` as `owner`, or as ourselves.
fn as_owner(cmd: &mut Command, owner: Option<Owner>) {
    if let Some(o) = owner {
        // As root, std also drops the supplementary groups (setgroups) with the uid.
        cmd.uid(o.uid).gid(o.gid);
    }
}

fn chown(path: &Path, o: Owner) {
    std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))
        .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `sql` with `psql` (of the same PostgreSQL) against the database at `url`: its
/// output, unaligned and without headers; panics if psql fails.
pub fn psql(url: &str, sql: &str) -> String {
    let out = run(Command::new(bindir().join("psql")).args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        url,
        "-c",
        sql,
    ]));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
