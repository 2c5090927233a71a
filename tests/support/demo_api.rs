//! demo/upstream.py (the demo APIs, also Anthropic's and OpenAI's wire formats) on a free
//! loopback port; stopped on drop.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_port, repo_root, Client};

pub struct DemoApi {
    pub port: u16,
    child: Child,
}

impl DemoApi {
    /// Starts it with `python` (it needs only the standard library; the LLM tests use
    /// the SDKs' venv so that one interpreter serves both).
    pub fn start(python: &str) -> DemoApi {
        let port = free_port();
        let child = Command::new(python)
            .arg(repo_root().join("demo/upstream.py"))
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut api = DemoApi { port, child };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = api.child.try_wait() {
                panic!("demo/upstream.py exited with {status}");
            }
            assert!(Instant::now() < deadline, "demo/upstream.py did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        api
    }

    pub fn get(&self, path: &str) -> Value {
        let r = Client::new(self.port).get("demo", path, &[]);
        assert_eq!(r.status, 200, "{path}");
        r.json()
    }

    /// Forgets the LLM records and the prompt caches.
    pub fn reset(&self) {
        let r = Client::new(self.port).post("demo", "/_demo/llm/reset", &[], "");
        assert_eq!(r.status, 200);
    }

    /// Every LLM request it answered, oldest first (GET /_demo/llm/log).
    pub fn log(&self) -> Vec<Value> {
        self.get("/_demo/llm/log").as_array().unwrap().clone()
    }
}

impl Drop for DemoApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
