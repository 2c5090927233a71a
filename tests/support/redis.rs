//! Redis and Webdis (its HTTP front) on free loopback ports, for the second-level
//! cache. Installed from Debian by scripts/ensure-redis.sh; stopped on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::envoy::TempDir;
use super::{free_port, repo_root};

pub struct Webdis {
    pub port: u16,
    redis: Child,
    webdis: Option<Child>,
    _dir: TempDir,
}

impl Webdis {
    pub fn start() -> Webdis {
        super::ensure("ensure-redis.sh");
        let dir = TempDir::new();
        let redis_port = free_port();
        let redis = Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let port = free_port();
        let config = dir.0.join("webdis.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"redis_host": "127.0.0.1", "redis_port": {redis_port}, "http_host": "127.0.0.1", "http_port": {port},
                    "threads": 2, "daemonize": false, "database": 0, "verbosity": 1, "logfile": "{}"}}"#,
                dir.0.join("webdis.log").display()
            ),
        )
        .unwrap();
        let webdis = Command::new("webdis")
            .arg(&config)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let w = Webdis {
            port,
            redis,
            webdis: Some(webdis),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = super::envoy::admin_get(port, "/PING") {
                if text.contains("PONG") {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "webdis did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        w
    }

    /// Stops Webdis (Redis stays): the second level is down.
    pub fn stop_front(&mut self) {
        if let Some(mut w) = self.webdis.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Drop for Webdis {
    fn drop(&mut self) {
        self.stop_front();
        let _ = self.redis.kill();
        let _ = self.redis.wait();
    }
}
