//! The Claude Code statusline script (contrib/claude-code/pag0-statusline.mjs) against a
//! real Envoy with the reference configuration, its session header set to the one Claude
//! Code sends: the exact line it prints after priced calls, past the alert threshold,
//! killed, stopped by the kill switch, for a session pag0 has not seen, with a wrong key,
//! and when pag0 is down or never answers. Skipped (with a message) when `node` is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{free_port, repo_root, Client, Envoy, Upstream};

const KEY: &str = "demo-key";
const ADMIN: [(&str, &str); 1] = [("authorization", "Bearer demo-admin")];
/// The header Claude Code sends its session id in, on every API request.
const SESSION_HEADER: &str = "x-claude-code-session-id";

/// True when `node` runs; else says why the test is skipped.
fn have_node() -> bool {
    let ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: `node` is not installed; the statusline script needs Node 18+");
    }
    ok
}

/// The reference configuration with `identity.sessionHeader` set to Claude Code's header.
fn claude_code_envoy(upstream: u16) -> Envoy {
    // The reference identity reads Claude Code's session header (after x-pag0-session).
    Envoy::reference(upstream)
}

/// A session id shaped like Claude Code's (a UUID), unique to this run.
fn claude_session_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        n & 0xffff,
        nanos & 0xfff,
        (nanos >> 12) & 0xfff,
        u64::from(nanos) << 8 | n
    )
}

/// What Claude Code writes on the statusline command's stdin.
fn claude_code_input(session_id: &str) -> String {
    json!({
        "hook_event_name": "Status",
        "session_id": session_id,
        "transcript_path": format!("/home/dev/.claude/projects/app/{session_id}.jsonl"),
        "cwd": "/home/dev/app",
        "model": {"id": "claude-opus-5-5", "display_name": "Opus 5.5"},
        "workspace": {"current_dir": "/home/dev/app", "project_dir": "/home/dev/app"},
        "version": "2.1.332",
        "output_style": {"name": "default"},
        "cost": {
            "total_cost_usd": 0.42,
            "total_duration_ms": 180000,
            "total_api_duration_ms": 2300,
            "total_lines_added": 156,
            "total_lines_removed": 23
        },
        "exceeds_200k_tokens": false
    })
    .to_string()
}

struct Run {
    line: String,
    elapsed: Duration,
}

/// Runs the script as Claude Code would: `stdin` piped in, the `PAG0_*` variables given
/// (and no others from the test's environment). Checks it exits 0 with one line on
/// stdout and nothing on stderr.
fn statusline(stdin: &str, vars: &[(&str, &str)]) -> Run {
    let script = repo_root().join("contrib/claude-code/pag0-statusline.mjs");
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars() {
        if name.starts_with("PAG0_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(vars.iter().copied());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("node");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    assert!(stderr.is_empty(), "stderr: {stderr}");
    assert!(
        stdout.ends_with('\n') && stdout.matches('\n').count() == 1,
        "not one line: {stdout:?}"
    );
    Run {
        line: stdout.trim_end().to_string(),
        elapsed,
    }
}

/// The line for `session` with the tenant key and PAG0_URL at `envoy`, plus `extra`.
/// These runs check what is printed, not how fast: a generous timeout keeps them right
/// on a loaded machine (the timeout has tests of its own below).
fn line_for(envoy: &Envoy, session: &str, extra: &[(&str, &str)]) -> String {
    let url = format!("http://127.0.0.1:{}", envoy.port);
    let mut vars = vec![
        ("PAG0_URL", url.as_str()),
        ("PAG0_API_KEY", KEY),
        ("PAG0_TIMEOUT_MS", "10000"),
    ];
    vars.extend_from_slice(extra);
    statusline(&claude_code_input(session), &vars).line
}

/// Priced routes of envoy/reference.yaml: (host, path, price in USDC's 6 decimals).
type Route = (&'static str, &'static str, u64);
const SEARCH: Route = ("api.tavily.com", "/search", 20_000);
const CHAT: Route = ("api.openai.com", "/v1/chat/completions", 150_000);
const TRANSLATE: Route = ("api.deepl.com", "/v2/translate", 50_000);
const RESPONSES: Route = ("api.openai.com", "/v1/responses", 150_000);

/// A call of `session` by `agent`, as Claude Code would send it through Envoy (session
/// in Claude Code's header).
fn send(c: &mut Client, session: &str, agent: &str, route: Route) -> support::Response {
    let (host, path, _) = route;
    c.post(
        host,
        path,
        &[
            ("x-pag0-api-key", KEY),
            (SESSION_HEADER, session),
            ("x-pag0-agent", agent),
        ],
        &support::fresh_body(),
    )
}

/// A priced call that goes through and costs the route's price.
fn call(c: &mut Client, session: &str, agent: &str, route: Route) {
    let r = send(c, session, agent, route);
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "{}{}: {body}", route.0, route.1);
    assert_eq!(r.cost(), route.2, "{}{}", route.0, route.1);
}

fn spent(c: &mut Client, session: &str) -> String {
    let budget = c
        .get(
            "any.host",
            &format!("/_pag0/v1/sessions/{session}/budget"),
            &ADMIN,
        )
        .json();
    budget["session"]["spent"].as_str().unwrap().to_string()
}

#[test]
fn the_statusline_shows_the_session_spend_alert_kill_and_kill_switch() {
    if !have_node() {
        return;
    }
    let up = Upstream::start();
    let envoy = claude_code_envoy(up.port);
    let mut c = Client::new(envoy.port);
    let s = claude_session_id();

    call(&mut c, &s, "researcher-1", SEARCH);
    call(&mut c, &s, "researcher-1", SEARCH);
    call(&mut c, &s, "executor-1", CHAT);
    call(&mut c, &s, "researcher-1", TRANSLATE);
    // 2 × 20000 + 150000 + 50000
    assert_eq!(spent(&mut c, &s), "240000");
    assert_eq!(line_for(&envoy, &s, &[]), "pag0 $0.24 / $5.00");
    // Another unit: 4 decimals, another symbol; a Host header and a trailing slash.
    let url = format!("http://127.0.0.1:{}/", envoy.port);
    assert_eq!(
        line_for(
            &envoy,
            &s,
            &[
                ("PAG0_URL", url.as_str()),
                ("PAG0_DECIMALS", "4"),
                ("PAG0_SYMBOL", "€"),
                ("PAG0_HOST", "pag0.internal"),
            ]
        ),
        "pag0 €24.00 / €500.00"
    );
    // A call in flight holds its price in reserve (the upstream answers it in 2 s).
    let port = envoy.port;
    let session = s.clone();
    let slow = std::thread::spawn(move || {
        let slow_search = (SEARCH.0, "/search/delay/2000/", SEARCH.2);
        call(
            &mut Client::new(port),
            &session,
            "researcher-1",
            slow_search,
        );
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut line = String::new();
    while Instant::now() < deadline {
        line = line_for(&envoy, &s, &[("PAG0_FLUSH", "1")]);
        if line != "pag0 $0.24 / $5.00" {
            break;
        }
    }
    assert_eq!(line, "pag0 $0.24 / $5.00 (+$0.02 reserved)");
    slow.join().unwrap();
    assert_eq!(spent(&mut c, &s), "260000");
    // The key also goes as `Authorization: Bearer` when the header is named so.
    assert_eq!(
        line_for(
            &envoy,
            &s,
            &[
                ("PAG0_API_KEY_HEADER", "authorization"),
                ("PAG0_API_KEY", "Bearer demo-key"),
            ]
        ),
        "pag0 $0.26 / $5.00"
    );

    // Past the alert threshold (0.7): ralph's 20 messages and 3 more by executor.
    for _ in 0..20 {
        call(&mut c, &s, "ralph-1", RESPONSES);
    }
    for _ in 0..3 {
        call(&mut c, &s, "executor-1", RESPONSES);
    }
    // 260000 + 23 × 150000 = 3710000: 74.2 % of 5000000.
    assert_eq!(spent(&mut c, &s), "3710000");
    assert_eq!(line_for(&envoy, &s, &[]), "pag0 $3.71 / $5.00 ⚠ 74%");

    // The admin's kill switch, and back.
    let kill = c.post(
        "any.host",
        &format!("/_pag0/v1/sessions/{s}/kill"),
        &ADMIN,
        "",
    );
    assert_eq!(kill.status, 200);
    assert_eq!(line_for(&envoy, &s, &[]), "pag0 $3.71 / $5.00 ⛔ killed");
    let resume = c.post(
        "any.host",
        &format!("/_pag0/v1/sessions/{s}/resume"),
        &ADMIN,
        "",
    );
    assert_eq!(resume.status, 200);
    assert_eq!(line_for(&envoy, &s, &[]), "pag0 $3.71 / $5.00 ⚠ 74%");

    // The kill switch threshold (0.9): 4500000 spent stops the session.
    let t = claude_session_id();
    for _ in 0..20 {
        call(&mut c, &t, "ralph-1", RESPONSES);
    }
    for _ in 0..10 {
        call(&mut c, &t, "executor-1", RESPONSES);
    }
    let refused = send(&mut c, &t, "researcher-1", SEARCH);
    assert_eq!(
        (refused.status, refused.error_code().as_deref()),
        (403, Some("KILL_SWITCH_ACTIVE"))
    );
    assert_eq!(spent(&mut c, &t), "4500000");
    assert_eq!(
        line_for(&envoy, &t, &[]),
        "pag0 $4.50 / $5.00 ⛔ kill switch 90%"
    );
}

#[test]
fn the_statusline_handles_new_sessions_bad_keys_and_missing_ids() {
    if !have_node() {
        return;
    }
    let up = Upstream::start();
    let envoy = claude_code_envoy(up.port);
    let mut c = Client::new(envoy.port);
    let s = claude_session_id();
    call(&mut c, &s, "main", SEARCH);
    assert_eq!(spent(&mut c, &s), "20000");

    // A session pag0 has not seen a call of yet (the report API answers 404 NOT_FOUND).
    let unseen = claude_session_id();
    assert_eq!(line_for(&envoy, &unseen, &[]), "pag0 $0.00 (no calls yet)");
    // A wrong key, or none: 401.
    assert_eq!(
        line_for(&envoy, &s, &[("PAG0_API_KEY", "not-the-key")]),
        "pag0 key refused (PAG0_API_KEY)"
    );
    let url = format!("http://127.0.0.1:{}", envoy.port);
    assert_eq!(
        statusline(&claude_code_input(&s), &[("PAG0_URL", url.as_str())]).line,
        "pag0 key refused (PAG0_API_KEY)"
    );
    // The right key still reads it, also asking every worker to write its counts first.
    assert_eq!(line_for(&envoy, &s, &[]), "pag0 $0.02 / $5.00");
    assert_eq!(
        line_for(&envoy, &s, &[("PAG0_FLUSH", "1")]),
        "pag0 $0.02 / $5.00"
    );
    // A prefix pag0 does not serve.
    assert_eq!(
        line_for(&envoy, &s, &[("PAG0_PREFIX", "/_pag0/v9")]),
        "pag0 API not found (PAG0_URL, PAG0_PREFIX)"
    );
    // No session id on stdin, or not JSON at all.
    let vars = [("PAG0_URL", url.as_str()), ("PAG0_API_KEY", KEY)];
    assert_eq!(statusline("{}", &vars).line, "pag0 —");
    assert_eq!(statusline("not json", &vars).line, "pag0 —");
    assert_eq!(statusline("", &vars).line, "pag0 —");
    // PAG0_SESSION names the session when pag0 takes it from another header.
    let by_env = [
        ("PAG0_URL", url.as_str()),
        ("PAG0_API_KEY", KEY),
        ("PAG0_SESSION", s.as_str()),
    ];
    assert_eq!(statusline("{}", &by_env).line, "pag0 $0.02 / $5.00");
}

/// How long `node` takes to start and exit on this machine now: the bounds below allow
/// for it (it is seconds on a loaded machine) and check the script adds little to it.
fn node_startup() -> Duration {
    let started = Instant::now();
    let ok = Command::new("node")
        .args(["-e", "0"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "node -e 0 failed");
    started.elapsed()
}

#[test]
fn the_statusline_says_so_quickly_when_pag0_is_down() {
    if !have_node() {
        return;
    }
    // Nothing listens on the port: connection refused, answered at once.
    let url = format!("http://127.0.0.1:{}", free_port());
    let startup = node_startup();
    let run = statusline(
        &claude_code_input(&claude_session_id()),
        &[("PAG0_URL", url.as_str()), ("PAG0_API_KEY", KEY)],
    );
    assert_eq!(run.line, "pag0 unreachable");
    let bound = startup * 2 + Duration::from_secs(1);
    assert!(
        run.elapsed < bound,
        "{:?} (node starts in {startup:?})",
        run.elapsed
    );
}

#[test]
fn the_statusline_gives_up_on_a_pag0_that_never_answers() {
    if !have_node() {
        return;
    }
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    for (timeout_ms, vars) in [
        (700, vec![("PAG0_TIMEOUT_MS", "700")]),
        // The default.
        (1500, vec![]),
    ] {
        let mut vars = vars;
        vars.extend([("PAG0_URL", url.as_str()), ("PAG0_API_KEY", KEY)]);
        let startup = node_startup();
        let run = statusline(&claude_code_input(&claude_session_id()), &vars);
        assert_eq!(run.line, "pag0 timeout");
        let bound = startup * 2 + Duration::from_millis(timeout_ms + 1000);
        assert!(
            run.elapsed < bound,
            "{:?} (node starts in {startup:?})",
            run.elapsed
        );
    }
}
