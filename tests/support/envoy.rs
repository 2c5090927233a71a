//! Starts a real Envoy with the built pag0.wasm, on free loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, repo_root};

pub fn envoy_bin() -> String {
    let out = Command::new(repo_root().join("scripts/ensure-envoy.sh"))
        .output()
        .expect("scripts/ensure-envoy.sh");
    assert!(
        out.status.success(),
        "ensure-envoy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The module under test: `PAG0_WASM` when set (to run a test against another build,
/// e.g. the one before a fix), else the one `make build` made.
pub fn wasm_path() -> PathBuf {
    let path = std::env::var_os("PAG0_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/wasm32-wasip1/release/pag0.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make build` first",
        path.display()
    );
    path
}

/// A route of a test config: requests for `domain` with a path starting with
/// `prefix` go to the test upstream (or to a dead port when `dead`).
#[derive(Clone)]
pub struct RouteSpec {
    pub domain: String,
    pub prefix: String,
    pub metadata: Vec<(String, String)>,
    pub dead: bool,
    /// Another cluster than the test upstream (one of `EnvoyConfig::clusters`).
    pub cluster: Option<String>,
    /// `prefix_rewrite` of the route.
    pub rewrite: Option<String>,
    /// A request header the route adds.
    pub add_header: Option<(String, String)>,
}

impl RouteSpec {
    /// Sends this route to the named extra cluster.
    pub fn to(mut self, cluster: &str) -> RouteSpec {
        self.cluster = Some(cluster.to_string());
        self
    }

    /// Rewrites the matched prefix to `to` (`prefix_rewrite`).
    pub fn rewrite(mut self, to: &str) -> RouteSpec {
        self.rewrite = Some(to.to_string());
        self
    }

    /// Adds a request header on the way upstream (`request_headers_to_add`).
    pub fn add_header(mut self, name: &str, value: &str) -> RouteSpec {
        self.add_header = Some((name.to_string(), value.to_string()));
        self
    }
}

pub fn route(domain: &str, prefix: &str, metadata: &[(&str, &str)]) -> RouteSpec {
    RouteSpec {
        domain: domain.to_string(),
        prefix: prefix.to_string(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        dead: false,
        cluster: None,
        rewrite: None,
        add_header: None,
    }
}

pub struct EnvoyConfig {
    pub plugin_json: String,
    pub routes: Vec<RouteSpec>,
    /// More clusters on loopback ports: (name, port).
    pub clusters: Vec<(String, u16)>,
}

impl EnvoyConfig {
    pub fn new(plugin_json: &str, routes: Vec<RouteSpec>) -> EnvoyConfig {
        EnvoyConfig {
            plugin_json: plugin_json.to_string(),
            routes,
            clusters: Vec::new(),
        }
    }

    pub fn render(&self, listener: u16, admin: u16, upstream: u16) -> String {
        let dead = free_port();
        let mut hosts: Vec<String> = Vec::new();
        for r in &self.routes {
            if !hosts.contains(&r.domain) {
                hosts.push(r.domain.clone());
            }
        }
        let mut vhosts = String::new();
        for (i, host) in hosts.iter().enumerate() {
            vhosts.push_str(&format!(
                "            - name: vh{i}\n              domains: [\"{host}\", \"{host}:*\"]\n              routes:\n"
            ));
            for r in self.routes.iter().filter(|r| &r.domain == host) {
                // A value starting with `=` is written raw (a YAML number), else quoted.
                let meta: Vec<String> = r
                    .metadata
                    .iter()
                    .map(|(k, v)| match v.strip_prefix('=') {
                        Some(raw) => format!("{k}: {raw}"),
                        None => format!("{k}: {v:?}"),
                    })
                    .collect();
                let cluster = match (&r.cluster, r.dead) {
                    (Some(name), _) => name.as_str(),
                    (None, true) => "dead",
                    (None, false) => "upstream",
                };
                let rewrite = r
                    .rewrite
                    .as_ref()
                    .map_or(String::new(), |to| format!(", prefix_rewrite: \"{to}\""));
                let added = r.add_header.as_ref().map_or(String::new(), |(k, v)| {
                    format!("                request_headers_to_add: [{{ header: {{ key: \"{k}\", value: \"{v}\" }} }}]\n")
                });
                vhosts.push_str(&format!(
                    "              - match: {{ prefix: \"{}\" }}\n                route: {{ cluster: {cluster}, timeout: 5s{rewrite} }}\n{added}                metadata: {{ filter_metadata: {{ pag0: {{ {} }} }} }}\n",
                    r.prefix,
                    meta.join(", ")
                ));
            }
        }
        let plugin = self.plugin_json.replace('\n', " ");
        let mut extra = String::new();
        for (name, port) in &self.clusters {
            extra.push_str(&format!(
                "  - name: {name}\n    type: STATIC\n    connect_timeout: 0.5s\n    load_assignment:\n      cluster_name: {name}\n      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]\n"
            ));
        }
        format!(
            r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: agents
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: agents
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: REJECT_REQUEST
          route_config:
            name: test
            virtual_hosts:
{vhosts}          http_filters:
          - name: pag0
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: pag0
                root_id: pag0
                failure_policy: FAIL_RELOAD
                allow_on_headers_stop_iteration: true
                vm_config:
                  vm_id: pag0
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {wasm} }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{plugin}'
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream} }} }} }} }}] }}]
  - name: loopback
    type: STATIC
    connect_timeout: 0.5s
    load_assignment:
      cluster_name: loopback
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }} }} }}] }}]
  - name: dead
    type: STATIC
    connect_timeout: 0.5s
    load_assignment:
      cluster_name: dead
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {dead} }} }} }} }}] }}]
{extra}"#,
            wasm = wasm_path().display(),
        )
    }
}

/// envoy/reference.yaml with its ports and the .wasm path rewritten for a test. The
/// x402 demo API and signer (18402, 18403) go to `x402` ports, else to closed ones.
pub fn reference_yaml(listener: u16, admin: u16, upstream: u16) -> String {
    reference_yaml_with(listener, admin, upstream, None)
}

pub fn reference_yaml_with(
    listener: u16,
    admin: u16,
    upstream: u16,
    x402: Option<(u16, u16)>,
) -> String {
    let text = std::fs::read_to_string(repo_root().join("envoy/reference.yaml")).unwrap();
    let (x402_api, signer) = x402.unwrap_or_else(|| (free_port(), free_port()));
    text.replace("port_value: 10000", &format!("port_value: {listener}"))
        .replace("port_value: 18402", &format!("port_value: {x402_api}"))
        .replace("port_value: 18403", &format!("port_value: {signer}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace("port_value: 18080", &format!("port_value: {upstream}"))
        .replace(
            "filename: target/wasm32-wasip1/release/pag0.wasm",
            &format!("filename: {}", wasm_path().display()),
        )
}

/// pag0's ledger in Redis (issue 14) added to a rendered config (`EnvoyConfig::render`
/// or `reference_yaml*`): the plugin JSON gains `"ledger": <ledger>` at its top level
/// (`ledger` is a JSON object's text, written as given) and a STATIC cluster
/// `pag0_ledger` points at Webdis on 127.0.0.1:`webdis_port`.
pub fn with_ledger(yaml: &str, webdis_port: u16, ledger: &str) -> String {
    assert!(
        !yaml.contains("\"ledger\":") && !yaml.contains("name: pag0_ledger"),
        "the config already has a ledger"
    );
    let ledger = ledger.replace('\n', " ");
    let cluster = format!(
        "  - name: pag0_ledger\n    type: STATIC\n    connect_timeout: 0.25s\n    load_assignment:\n      cluster_name: pag0_ledger\n      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {webdis_port} }} }} }} }}] }}]\n"
    );
    let list = "\n  clusters:\n";
    let at = yaml.find(list).expect("no static_resources.clusters") + list.len();
    let yaml = format!("{}{cluster}{}", &yaml[..at], &yaml[at..]);
    // The JSON is a block scalar (`value: |`, reference.yaml) or a single-quoted one.
    let (open, entry) = if let Some(block) = yaml.find("value: |\n") {
        let open = block + yaml[block..].find('{').expect("no plugin JSON");
        let line = yaml[..open].rfind('\n').unwrap() + 1;
        let indent = " ".repeat(open - line + 2);
        (open + 1, format!("\n{indent}\"ledger\": {ledger}"))
    } else {
        let quoted = yaml.find("value: '{").expect("no plugin JSON");
        (
            quoted + 9,
            format!(" \"ledger\": {} ", ledger.replace('\'', "''")),
        )
    };
    let empty = yaml[open..].trim_start().starts_with('}');
    let comma = if empty { "" } else { "," };
    format!("{}{entry}{comma}{}", &yaml[..open], &yaml[open..])
}

pub struct Envoy {
    pub port: u16,
    pub admin: u16,
    child: Child,
    pub log_path: PathBuf,
    /// The YAML it runs and its worker count, to start it again after a kill.
    config: PathBuf,
    workers: u32,
    _dir: TempDir,
}

impl Envoy {
    /// Starts Envoy with 2 workers and waits until it is ready.
    pub fn start(render: impl Fn(u16, u16) -> String) -> Envoy {
        Envoy::start_workers(render, 2)
    }

    /// Starts Envoy with `workers` worker threads.
    pub fn start_workers(render: impl Fn(u16, u16) -> String, workers: u32) -> Envoy {
        let port = free_port();
        let admin = free_port();
        let dir = TempDir::new();
        let config = dir.0.join("envoy.yaml");
        std::fs::write(&config, render(port, admin)).unwrap();
        let log_path = dir.0.join("envoy.log");
        let child = spawn(&config, workers, &log_path);
        let mut envoy = Envoy {
            port,
            admin,
            child,
            log_path,
            config,
            workers,
            _dir: dir,
        };
        envoy.wait_ready();
        envoy
    }

    /// Kills Envoy with SIGKILL (a crash: in-flight calls and its shared data are lost).
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a killed Envoy again with the same YAML and ports; waits until it is ready.
    /// Its logs go on in the same files.
    pub fn revive(&mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(Some(_))),
            "envoy is still running"
        );
        self.child = spawn(&self.config, self.workers, &self.log_path);
        self.wait_ready();
    }

    /// `kill_hard` then `revive`: an Envoy crash and restart on the same ports.
    pub fn restart(&mut self) {
        self.kill_hard();
        self.revive();
    }

    pub fn with_config(config: &EnvoyConfig, upstream: u16) -> Envoy {
        Envoy::start(|port, admin| config.render(port, admin, upstream))
    }

    pub fn reference(upstream: u16) -> Envoy {
        Envoy::start(|port, admin| reference_yaml(port, admin, upstream))
    }

    /// The reference configuration with the x402 demo API and signer on these ports.
    pub fn reference_with_x402(upstream: u16, x402_api: u16, signer: u16) -> Envoy {
        Envoy::start(|port, admin| {
            reference_yaml_with(port, admin, upstream, Some((x402_api, signer)))
        })
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("envoy exited with {status}:\n{}", self.log());
            }
            if let Ok(text) = admin_get(self.admin, "/ready") {
                if text.trim() == "LIVE" {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("envoy not ready after 20 s:\n{}", self.log());
    }

    /// What Envoy printed on stdout (the access log of the example configs).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.log_path.with_file_name("stdout.log")).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn admin_get(&self, path: &str) -> String {
        admin_get(self.admin, path).unwrap()
    }

    /// Resident memory of the Envoy process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs Envoy on `config`, appending its log to `log_path` and stdout to stdout.log next to it.
fn spawn(config: &Path, workers: u32, log_path: &Path) -> Child {
    let append = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
    };
    Command::new(envoy_bin())
        .args([
            "-c",
            config.to_str().unwrap(),
            "--concurrency",
            &workers.to_string(),
            "--disable-hot-restart",
            "--file-flush-interval-msec",
            "100",
            "-l",
            "info",
        ])
        .stdout(append(&log_path.with_file_name("stdout.log")))
        .stderr(append(log_path))
        .spawn()
        .unwrap()
}

/// One GET on a connection of its own; an error (not a panic) while the port is not
/// listening yet, whatever happens between connecting and answering.
pub fn admin_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(std::io::Error::other("no HTTP answer"));
    };
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Runs `envoy --mode validate` on a YAML text: (accepted, log output).
pub fn validate(yaml: &str) -> (bool, String) {
    let dir = TempDir::new();
    let config = dir.0.join("envoy.yaml");
    std::fs::write(&config, yaml).unwrap();
    let out = Command::new(envoy_bin())
        .args([
            "--mode",
            "validate",
            "-c",
            config.to_str().unwrap(),
            "--disable-hot-restart",
            "-l",
            "info",
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(super::unique("pag0-test"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
