//! The report API and the live page, served by the filter. Reports are read after
//! every VM has written what it counted: the API asks for a flush, writes this VM's
//! counts at once, and answers when the others have written theirs (each does on its
//! next tick), or after [`waiters::FLUSH_WAIT_MS`] at most.

use crate::core::admin::RemoteData as AdminData;
use crate::core::admin::{self, Access, AdminResponse, AdminRoute};
use crate::core::errors::Refusal;
use crate::core::ledger::{remote, remote_report};
use crate::host::callout;
use crate::host::outbox;
use crate::host::remote_ledger;
use crate::host::reply::send_local;
use crate::host::shared::HostStore;
use crate::host::stream::state::Pending;
use crate::host::stream::{waiters, Dispatch, Step, Stream};
use crate::host::{now_millis, vm};

pub fn serve(
    d: &dyn Dispatch,
    stream: &Stream,
    route: Result<AdminRoute, Refusal>,
    headers: &crate::host::abi::HeaderMap,
    path: &[u8],
) -> Step {
    stream.state.borrow_mut().answered = true;
    let cfg = &stream.config;
    let route = match route {
        Err(refusal) => return send(stream, AdminResponse::refusal(&refusal)),
        Ok(AdminRoute::Dashboard) => return send(stream, admin::dashboard(cfg)),
        Ok(route) => route,
    };
    let mut keys = Vec::new();
    for (name, value) in headers.iter() {
        if name == b"x-pag0-admin-key" || name == cfg.identity.api_key_header.as_bytes() {
            keys.push(value.to_vec());
        } else if name == b"authorization" {
            keys.extend(admin::bearer(value));
        }
    }
    let access = match admin::authorize(cfg, &keys) {
        Ok(access) => access,
        Err(refusal) => return send(stream, AdminResponse::refusal(&refusal)),
    };
    let tenant = query_param(path, "tenant");
    if let (Some(service), AdminRoute::Kill(id) | AdminRoute::Resume(id)) =
        (&cfg.ledger_redis, &route)
    {
        // The Redis ledger: the switch is thrown there first, for every Envoy.
        if access == Access::Admin {
            if let Ok(index) = admin::tenant_of(cfg, access, tenant.as_deref()) {
                let on = matches!(route, AdminRoute::Kill(_));
                let tag = remote_ledger::next_id();
                let body = remote::tagged(
                    &remote::kill_body(cfg.tenant_id(index), id, on, "manual"),
                    &tag,
                );
                let wait = RemoteWait {
                    tag,
                    read: false,
                    fresh: true,
                    route: route.clone(),
                    access,
                    tenant: tenant.clone(),
                    path: path.to_vec(),
                    body: body.clone(),
                    loaded: false,
                };
                return resend(
                    d,
                    stream,
                    service,
                    wait,
                    remote::eval_path(&service.path),
                    body,
                    "application/json",
                );
            }
        }
    }
    after_remote(d, stream, route, access, tenant, path, None)
}

/// A kill or resume through the Redis ledger, waiting for Redis.
#[derive(Debug)]
pub struct RemoteWait {
    /// The request's tag, which its answer carries back.
    tag: String,
    /// A report read (else a kill or resume).
    read: bool,
    /// Every VM of this Envoy wrote its counts before the read.
    fresh: bool,
    route: AdminRoute,
    access: Access,
    tenant: Option<String>,
    path: Vec<u8>,
    body: String,
    /// The script was loaded after a NOSCRIPT (once).
    loaded: bool,
}

/// Redis answered a kill or resume: in force for every Envoy; now this one.
pub fn on_remote_answer(
    d: &dyn Dispatch,
    stream: &Stream,
    mut wait: RemoteWait,
    body_size: usize,
) -> Step {
    let Some(service) = stream.config.ledger_redis.clone() else {
        return Step::Pause;
    };
    let status = callout::status();
    let body = callout::body(body_size);
    if wait.loaded && remote::loaded(&body) {
        // The script is loaded: the kill itself, again.
        wait.loaded = false;
        let request = wait.body.clone();
        return resend(
            d,
            stream,
            &service,
            wait,
            remote::eval_path(&service.path),
            request,
            "application/json",
        );
    }
    match remote::script_answer(status, &body, &wait.tag) {
        Ok(answer) if wait.read => {
            let cfg = &stream.config;
            let now = now_millis() / 1000;
            let tenant = admin::tenant_of(cfg, wait.access, wait.tenant.as_deref())
                .map(|i| cfg.tenant_id(i).to_string())
                .unwrap_or_default();
            let max_agents = cfg.sessions.max_agents;
            let data = match &wait.route {
                AdminRoute::Sessions => {
                    let (list, total, windows) =
                        remote_report::list_answer(&tenant, &answer, now, max_agents);
                    AdminData::List(list, total, windows)
                }
                AdminRoute::Budget(id) | AdminRoute::Report(id) => {
                    let (session, windows) =
                        remote_report::read_answer(&tenant, id, &answer, now, max_agents);
                    AdminData::Session(session.map(Box::new), windows)
                }
                _ => {
                    return send(
                        stream,
                        AdminResponse::refusal(&remote::unavailable("unexpected route")),
                    )
                }
            };
            // Whoever reads a report list merges it: the merge goes back as one entry.
            match &data {
                AdminData::List(list, _, _) => list
                    .iter()
                    .filter_map(|s| s.compaction.clone())
                    .for_each(remote_ledger::queue_compaction),
                AdminData::Session(Some(s), _) => {
                    if let Some(c) = s.compaction.clone() {
                        remote_ledger::queue_compaction(c);
                    }
                }
                AdminData::Session(None, _) => {}
            }
            let mut response =
                admin::handle_remote(cfg, wait.access, &wait.route, wait.tenant.as_deref(), &data);
            if !wait.fresh {
                // Some VM of this Envoy did not get its counts to Redis in time.
                response
                    .headers
                    .push(("x-pag0-report-stale", "true".to_string()));
            }
            send(stream, response)
        }
        Ok(answer) => {
            let was_killed = answer.get("was").and_then(serde_json::Value::as_bool);
            after_remote(
                d,
                stream,
                wait.route,
                wait.access,
                wait.tenant,
                &wait.path,
                was_killed,
            )
        }
        Err(remote::Fault::NoScript) if !wait.loaded => {
            wait.loaded = true;
            resend(
                d,
                stream,
                &service,
                wait,
                remote::load_path(&service.path),
                remote::SCRIPT.to_string(),
                "text/plain",
            )
        }
        Err(remote::Fault::NoScript) => send(
            stream,
            AdminResponse::refusal(&remote::unavailable("Redis did not load the ledger script")),
        ),
        Err(remote::Fault::Unavailable(why)) => {
            send(stream, AdminResponse::refusal(&remote::unavailable(&why)))
        }
    }
}

fn resend(
    d: &dyn Dispatch,
    stream: &Stream,
    service: &crate::core::compile::Service,
    wait: RemoteWait,
    path: String,
    body: String,
    content_type: &str,
) -> Step {
    match callout::send_to(
        d,
        service,
        "PUT",
        &path,
        Some((content_type, body.as_bytes())),
        service.timeout_ms,
    ) {
        Ok(token) => {
            d.wait_for(stream, token, Pending::AdminRemote(Box::new(wait)));
            Step::Pause
        }
        Err(_) => send(
            stream,
            AdminResponse::refusal(&remote::unavailable("cannot call the ledger's cluster")),
        ),
    }
}

fn after_remote(
    d: &dyn Dispatch,
    stream: &Stream,
    route: AdminRoute,
    access: Access,
    tenant: Option<String>,
    path: &[u8],
    ledger_was_killed: Option<bool>,
) -> Step {
    let cfg = &stream.config;
    let now = now_millis();
    // Kill and resume change the switch first, then make every VM forget the records
    // it saw (free calls and cache hits take the switch from them): once the API
    // answers, the switch is in force on every worker. Reports flush first, then read.
    let then = if matches!(route, AdminRoute::Kill(_) | AdminRoute::Resume(_)) {
        let response = admin::handle(
            cfg,
            &HostStore,
            access,
            &route,
            tenant.as_deref(),
            now / 1000,
            ledger_was_killed,
        );
        if response.status != 200 {
            return send(stream, response);
        }
        AfterFlush::Send(Box::new(response))
    } else {
        AfterFlush::Report {
            route,
            access,
            tenant,
        }
    };
    // `?flush=false` (a page polling often): read what the workers have written, which
    // each does on its own at most `ledger.flushIntervalMs` after a call.
    if matches!(then, AfterFlush::Report { .. })
        && query_param(path, "flush").as_deref() == Some("false")
    {
        after_flush(d, stream, then, true);
        return Step::Pause;
    }
    let requested = vm::with(|vm| vm.ledger.request_flush(cfg, &HostStore, now));
    match requested {
        Ok((epoch, alerts)) => {
            outbox::queue_alerts(cfg, alerts);
            if vm::with(|vm| vm.ledger.flushed(cfg, &HostStore, epoch, now)) {
                after_flush(d, stream, then, true);
            } else {
                waiters::wait_for_flush(stream.clone(), epoch, then);
            }
        }
        Err(_) => after_flush(d, stream, then, false),
    }
    Step::Pause
}

/// What an admin call does once every VM has written its counts and forgotten what it
/// saw (or the wait ran out: `done` false).
pub enum AfterFlush {
    /// Read and answer a report.
    Report {
        route: AdminRoute,
        access: Access,
        tenant: Option<String>,
    },
    /// Send an answer made before the flush (kill, resume).
    Send(Box<AdminResponse>),
}

pub fn after_flush(d: &dyn Dispatch, stream: &Stream, then: AfterFlush, done: bool) {
    match then {
        AfterFlush::Report {
            route,
            access,
            tenant,
        } => {
            if stream.config.ledger_redis.is_some() {
                let _ = read_remote(d, stream, route, access, tenant, done);
                return;
            }
            answer(stream, &route, access, tenant.as_deref(), done)
        }
        AfterFlush::Send(response) => {
            let _ = send(stream, *response);
        }
    }
}

/// With the Redis ledger a report is read there (after every VM of this Envoy wrote
/// what it counted to Redis: other Envoys' VMs write theirs every flushIntervalMs).
fn read_remote(
    d: &dyn Dispatch,
    stream: &Stream,
    route: AdminRoute,
    access: Access,
    tenant: Option<String>,
    fresh: bool,
) -> Step {
    let cfg = &stream.config;
    let Some(service) = cfg.ledger_redis.clone() else {
        return Step::Pause;
    };
    let request = admin::remote_read(cfg, access, &route, tenant.as_deref(), now_millis() / 1000);
    match request {
        Err(refusal) => send(stream, AdminResponse::refusal(&refusal)),
        Ok(None) => {
            answer(stream, &route, access, tenant.as_deref(), fresh);
            Step::Pause
        }
        Ok(Some(body)) => {
            let tag = remote_ledger::next_id();
            let body = remote::tagged(&body, &tag);
            let wait = RemoteWait {
                tag,
                read: true,
                fresh,
                route,
                access,
                tenant,
                path: Vec::new(),
                body: body.clone(),
                loaded: false,
            };
            resend(
                d,
                stream,
                &service,
                wait,
                remote::eval_path(&service.path),
                body,
                "application/json",
            )
        }
    }
}

/// Answers an authorized call (after the flush, or without it for kill and resume).
pub fn answer(
    stream: &Stream,
    route: &AdminRoute,
    access: Access,
    tenant: Option<&str>,
    fresh: bool,
) {
    let cfg = &stream.config;
    let mut response = admin::handle(
        cfg,
        &HostStore,
        access,
        route,
        tenant,
        now_millis() / 1000,
        None,
    );
    if !fresh {
        // Some VM did not write its counts in time: the report may miss its last calls.
        response
            .headers
            .push(("x-pag0-report-stale", "true".to_string()));
    }
    let _ = send(stream, response);
}

fn send(stream: &Stream, response: AdminResponse) -> Step {
    outbox::queue_alerts(&stream.config, response.alerts.clone());
    let code = response.code.map(|c| c.as_str());
    let mut headers: Vec<(&str, &[u8])> = vec![
        ("content-type", response.content_type.as_bytes()),
        ("cache-control", b"no-store"),
    ];
    for (k, v) in &response.headers {
        headers.push((k, v.as_bytes()));
    }
    if let Some(code) = code {
        headers.push(("x-pag0-error", code.as_bytes()));
    }
    send_local(response.status, &headers, response.body.as_bytes());
    Step::Pause
}

fn query_param(path: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(path).ok()?;
    let (_, query) = text.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}
