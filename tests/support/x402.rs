//! The x402 world on loopback for tests: the official SDKs' paid servers (Python v2,
//! npm v1), the reference signer and the local facilitator (demo/x402/), each stopped
//! when its handle drops.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, repo_root, Client};

pub struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn python() -> String {
    super::ensure("ensure-x402-venv.sh")
}

pub fn start(py: &str, script: &str, args: &[&str], env: &[(&str, &str)]) -> Python {
    let mut cmd = Command::new(py);
    cmd.arg(repo_root().join("demo/x402").join(script))
        .current_dir(repo_root().join("demo/x402"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Python(cmd.spawn().unwrap())
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Node with the npm x402 v1 packages installed (demo/x402/v1).
pub fn node() -> String {
    super::ensure("ensure-x402-npm.sh")
}

/// The x402 world on loopback: facilitator, the v2 (Python SDK) and v1 (npm
/// x402-express) paid servers, and the reference signer. Stopped on drop.
pub struct Peers {
    pub py: String,
    pub facilitator: u16,
    pub v2: u16,
    pub v1: u16,
    pub signer: u16,
    _procs: Vec<Python>,
}

impl Peers {
    pub fn start() -> Peers {
        let (py, node) = (python(), node());
        let (facilitator, v2, v1, signer) = (free_port(), free_port(), free_port(), free_port());
        let fac_url = format!("http://127.0.0.1:{facilitator}");
        let mut procs = vec![start(
            &py,
            "facilitator.py",
            &["--port", &facilitator.to_string()],
            &[],
        )];
        wait_port(facilitator);
        procs.push(start(
            &py,
            "server.py",
            &["--port", &v2.to_string(), "--facilitator", &fac_url],
            &[],
        ));
        procs.push(start(
            &node,
            "v1/server.mjs",
            &["--port", &v1.to_string(), "--facilitator", &fac_url],
            &[],
        ));
        let key = format!("0x{}", "7c".repeat(32));
        procs.push(start(
            &py,
            "signer.py",
            &["--port", &signer.to_string()],
            &[("PAG0_SIGNER_KEY", key.as_str())],
        ));
        for port in [v2, v1, signer] {
            wait_port(port);
        }
        Peers {
            py,
            facilitator,
            v2,
            v1,
            signer,
            _procs: procs,
        }
    }

    pub fn settlements(&self) -> serde_json::Value {
        Client::new(self.facilitator)
            .get("facilitator", "/settlements", &[])
            .json()
    }

    pub fn settled_total(&self) -> u64 {
        self.settlements()["total"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn control(&self, port: u16, body: &str) {
        let r = Client::new(port).post(
            "peer",
            "/control",
            &[("content-type", "application/json")],
            body,
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    pub fn signed(&self) -> u64 {
        Client::new(self.signer)
            .get("signer", "/signed", &[])
            .json()["count"]
            .as_u64()
            .unwrap()
    }
}
