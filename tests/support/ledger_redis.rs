//! The Redis ledger of record (issue 14) on free loopback ports: redis-server with an
//! append-only file fsynced on every write, and Webdis in front of it accepting only
//! EVALSHA and SCRIPT (scripts/lib/webdis-ledger-acl.json). Several Envoys share one;
//! tests stop, restart and pause Redis under them. Everything stops on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::envoy::TempDir;
use super::{free_port, repo_root};

pub struct LedgerRedis {
    redis_port: u16,
    webdis_port: u16,
    redis: Option<Child>,
    webdis: Child,
    paused: bool,
    basic_auth: Option<String>,
    dir: TempDir,
}

/// The Webdis ACL pag0's ledger runs behind; with `basic_auth` ("user:password") the
/// allowing rule also requires that HTTP Basic credential (all else gets 403).
pub fn webdis_acl(basic_auth: Option<&str>) -> serde_json::Value {
    let path = repo_root().join("scripts/lib/webdis-ledger-acl.json");
    let mut acl: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    if let Some(auth) = basic_auth {
        for rule in acl.as_array_mut().unwrap() {
            if rule.get("enabled").is_some() {
                rule["http_basic_auth"] = auth.into();
            }
        }
    }
    acl
}

impl LedgerRedis {
    /// Redis (AOF on) and the locked-down Webdis, both answering when this returns.
    pub fn start() -> LedgerRedis {
        LedgerRedis::start_with(None)
    }

    /// The same with Webdis requiring HTTP Basic `user:password` for EVALSHA and SCRIPT.
    pub fn start_with(basic_auth: Option<&str>) -> LedgerRedis {
        super::ensure("ensure-redis.sh");
        let dir = TempDir::new();
        let redis_port = free_port();
        let webdis_port = free_port();
        let config = dir.0.join("webdis.json");
        let webdis_config = serde_json::json!({
            "redis_host": "127.0.0.1", "redis_port": redis_port,
            "http_host": "127.0.0.1", "http_port": webdis_port,
            "threads": 2, "daemonize": false, "database": 0, "verbosity": 1,
            "logfile": dir.0.join("webdis.log"),
            "acl": webdis_acl(basic_auth),
        });
        std::fs::write(&config, webdis_config.to_string()).unwrap();
        let mut ledger = LedgerRedis {
            redis_port,
            webdis_port,
            redis: None,
            webdis: Command::new("webdis")
                .arg(&config)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
            paused: false,
            basic_auth: basic_auth.map(str::to_string),
            dir,
        };
        ledger.start_redis();
        ledger
    }

    pub fn webdis_port(&self) -> u16 {
        self.webdis_port
    }

    pub fn redis_port(&self) -> u16 {
        self.redis_port
    }

    /// The `authorization` header value Webdis wants when started with Basic auth.
    pub fn authorization(&self) -> Option<String> {
        Some(format!(
            "Basic {}",
            base64(self.basic_auth.as_ref()?.as_bytes())
        ))
    }

    /// Redis's working directory (its AOF is in `appendonlydir/`, its log in redis.log).
    pub fn dir(&self) -> PathBuf {
        self.dir.0.join("redis")
    }

    /// Starts Redis on its port and directory (replaying the AOF after a stop) and
    /// waits until Redis answers PING and Webdis reaches it again.
    pub fn start_redis(&mut self) {
        assert!(self.redis.is_none(), "redis is already running");
        let dir = self.dir();
        std::fs::create_dir_all(&dir).unwrap();
        let port = self.redis_port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--dir", dir.to_str().unwrap(), "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--daemonize", "no", "--logfile", "redis.log"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.redis = Some(child);
        self.wait_until("redis-server to answer PING", |l| {
            l.try_cli(&["PING"]).as_deref() == Some("PONG")
        });
        // Each Webdis thread reconnects on its own: wait until several in a row answer.
        self.wait_until("webdis to reach redis", |l| {
            (0..4).all(|_| l.webdis_reaches_redis())
        });
    }

    /// Stops Redis cleanly (SIGTERM, as a service manager would) and waits for it.
    pub fn stop_redis(&mut self) {
        self.resume_redis();
        if let Some(mut child) = self.redis.take() {
            signal(child.id(), "-TERM");
            let _ = child.wait();
        }
    }

    /// Kills Redis with SIGKILL (a crash: only what the AOF fsynced survives).
    pub fn kill_redis(&mut self) {
        if let Some(mut child) = self.redis.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Freezes Redis (SIGSTOP): connections stay open and Webdis requests hang.
    pub fn pause_redis(&mut self) {
        let pid = self.redis.as_ref().expect("redis is not running").id();
        signal(pid, "-STOP");
        self.paused = true;
    }

    /// Thaws a paused Redis (SIGCONT); the commands queued meanwhile then run.
    pub fn resume_redis(&mut self) {
        if self.paused {
            if let Some(child) = &self.redis {
                signal(child.id(), "-CONT");
            }
            self.paused = false;
        }
    }

    /// `redis-cli -p <port> args…`: its stdout without the last newline (redis-cli's
    /// raw format, as its output is not a terminal: one line per reply element). Hangs
    /// while Redis is paused, like every client.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.redis_port.to_string()])
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let text = text.strip_suffix('\n').unwrap_or(&text).to_string();
        out.status.success().then_some(text)
    }

    /// SCRIPT EXISTS (allowed by the ACL, changes nothing) answers 200, not 503.
    fn webdis_reaches_redis(&self) -> bool {
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.webdis_port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        use std::io::{Read, Write};
        let auth = self
            .authorization()
            .map_or(String::new(), |a| format!("authorization: {a}\r\n"));
        let request = format!(
            "GET /SCRIPT/EXISTS/0 HTTP/1.1\r\nhost: webdis\r\n{auth}connection: close\r\n\r\n"
        );
        let mut answer = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut answer).is_ok()
            && answer.starts_with("HTTP/1.1 200")
    }

    fn wait_until(&self, what: &str, ready: impl Fn(&LedgerRedis) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready(self) {
            assert!(
                Instant::now() < deadline,
                "waited 20 s for {what}; redis.log:\n{}",
                std::fs::read_to_string(self.dir().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Standard base64 with padding (for an HTTP Basic credential).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            let c = if i <= chunk.len() {
                ABC[(n >> (18 - 6 * i) & 63) as usize]
            } else {
                b'='
            };
            out.push(c as char);
        }
    }
    out
}

/// `kill <signal> <pid>` (std's Child::kill only sends SIGKILL).
fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid} failed");
}

impl Drop for LedgerRedis {
    fn drop(&mut self) {
        self.resume_redis();
        let _ = self.webdis.kill();
        let _ = self.webdis.wait();
        if let Some(mut child) = self.redis.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
