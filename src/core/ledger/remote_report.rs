//! Reports with the Redis ledger: every VM of every Envoy appends its report counts of
//! a session to that session's list in Redis at its flush (`<unix secs>:<base64 of the
//! encoded delta>`); whoever reads the report merges the list in order and replaces
//! what it merged by the merge (compaction), so lists stay short. Budget figures come
//! from the session's hash and the tenant's day and month, as ledger.lua keeps them.
//! The records built here have the shapes the shared-data ledger keeps, so the report
//! API and the live page read both the same way.

use serde_json::{json, Value};

use crate::core::amount::Amount;
use crate::core::base64;
use crate::core::ledger::budget::{BudgetAgent, BudgetRecord, Owner, NO_AGENT};
use crate::core::ledger::remote::{
    day_key, index_key, month_key, report_key, report_prefix, session_key, session_prefix,
};
use crate::core::ledger::report::ReportRecord;
use crate::core::ledger::windows::{WindowCounter, WindowOwner, WindowsRecord};
use crate::core::window::{day_index, month_index};

/// A list longer than this after a push is compacted by the VM that pushed.
pub const COMPACT_AT: u64 = 256;
/// How long a session's report list is kept after its last push.
pub const REPORT_EXPIRE_SECS: u64 = 30 * 86_400;

/// One list entry: when it was flushed, and the counts.
pub fn entry(now_secs: u64, delta: &ReportRecord) -> String {
    format!("{now_secs}:{}", base64::encode(&delta.encode()))
}

/// One VM's counts of one session, to append to the session's list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Unique: Redis appends an entry once, however often it is sent.
    pub id: String,
    /// Order of sending, set by the VM that queues it.
    pub seq: u64,
    pub key: String,
    pub entry: String,
    pub tenant: String,
    pub session: String,
}

/// Appends entries.
pub fn report_body(items: &[Push]) -> String {
    json!({
        "op": "report",
        "x": REPORT_EXPIRE_SECS,
        "items": items.iter().map(|p| json!({"k": p.key, "d": p.entry, "id": p.id})).collect::<Vec<_>>(),
    })
    .to_string()
}

/// The lists' lengths after the push, in order.
pub fn read_lengths(answer: &Value) -> Vec<u64> {
    match answer.get("n") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().and_then(|s| s.parse().ok()).unwrap_or(0))
            .collect(),
        _ => Vec::new(),
    }
}

/// One session's figures and report entries.
pub fn read_body(tenant: &str, session: &str, now_secs: u64) -> String {
    json!({
        "op": "read",
        "session": session_key(tenant, session),
        "rep": report_key(tenant, session),
        "day": day_key(tenant, now_secs),
        "month": month_key(tenant, now_secs),
    })
    .to_string()
}

/// A tenant's newest sessions, with their figures and report entries.
pub fn list_body(tenant: &str, n: usize, now_secs: u64) -> String {
    json!({
        "op": "list",
        "index": index_key(tenant),
        "n": n,
        "sp": session_prefix(tenant),
        "rp": report_prefix(tenant),
        "day": day_key(tenant, now_secs),
        "month": month_key(tenant, now_secs),
    })
    .to_string()
}

/// Replaces the first `n` entries of a list (the first being `head`) by `merged`.
pub fn compact_body(key: &str, n: usize, head: &str, merged: &str) -> String {
    json!({"op": "compact", "k": key, "n": n, "head": head, "d": merged}).to_string()
}

/// A compaction to send: the list, how many entries were merged, the first of them,
/// and the merge as one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compaction {
    pub key: String,
    pub n: usize,
    pub head: String,
    pub merged: String,
}

fn strings(v: Option<&Value>) -> Vec<&str> {
    match v {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// HGETALL's flat list as (field, number) pairs (non-numbers as 0).
fn pairs<'a>(flat: &[&'a str]) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    let fields: Vec<(&'a str, &'a str)> = flat
        .chunks(2)
        .filter_map(|c| Some((*c.first()?, *c.get(1)?)))
        .collect();
    fields.into_iter()
}

fn number(s: &str) -> Amount {
    s.parse().unwrap_or(0)
}

/// A compaction's entry: a whole record (its chart included), not a VM's delta.
fn merged_entry(record: &ReportRecord) -> String {
    format!("c0:{}", base64::encode(&record.encode()))
}

/// Merges a report list's entries in order (entries that do not decode are skipped).
/// A first entry that is a compaction's merge is the starting record, chart and all.
pub fn merge_entries(session: &str, entries: &[&str], max_agents: u16) -> ReportRecord {
    let mut record = ReportRecord::new(session);
    for (i, e) in entries.iter().enumerate() {
        let Some((at, data)) = e.split_once(':') else {
            continue;
        };
        let Some(bytes) = base64::decode(data) else {
            continue;
        };
        let Ok(delta) = ReportRecord::decode(&bytes) else {
            continue;
        };
        if i == 0 && at.starts_with('c') {
            record = delta;
            record.session_id = session.to_string();
        } else {
            record.merge(&delta, max_agents, at.parse().unwrap_or(0));
        }
    }
    record
}

/// The session's budget record as the shared-data ledger would hold it: spent, kill
/// switch, agent budgets and what is reserved (as one owner per agent budget).
pub fn budget_record(session: &str, flat: &[&str]) -> BudgetRecord {
    let mut record = BudgetRecord::new(session, 0);
    let mut reserved_total: Amount = 0;
    let mut agent_reserved: Vec<(String, Amount)> = Vec::new();
    for (field, value) in pairs(flat) {
        match field {
            "spent" => record.spent = number(value),
            "reserved" => reserved_total = number(value),
            "killed" => record.killed = true,
            "alerts" => record.alerts = u8::try_from(number(value)).unwrap_or(0),
            "last" => record.last_active = number(value),
            _ => {
                let Some(rest) = field.strip_prefix("a:") else {
                    continue;
                };
                let Some((agent, what)) = rest.rsplit_once(':') else {
                    continue;
                };
                let index = match record.agents.iter().position(|a| a.id == agent) {
                    Some(i) => i,
                    None => {
                        record.agents.push(BudgetAgent {
                            id: agent.to_string(),
                            spent: 0,
                            alerts: 0,
                        });
                        record.agents.len() - 1
                    }
                };
                match what {
                    "spent" => record.agents[index].spent = number(value),
                    "alerts" => {
                        record.agents[index].alerts = u8::try_from(number(value)).unwrap_or(0)
                    }
                    "reserved" => agent_reserved.push((agent.to_string(), number(value))),
                    _ => {}
                }
            }
        }
    }
    let mut in_agents: Amount = 0;
    for (agent, amount) in agent_reserved {
        if amount == 0 {
            continue;
        }
        let index = record
            .agents
            .iter()
            .position(|a| a.id == agent)
            .unwrap_or(usize::MAX);
        in_agents = in_agents.saturating_add(amount);
        record.owners.push(Owner {
            vm: 0,
            agent: u8::try_from(index).unwrap_or(NO_AGENT),
            amount,
            count: 0,
        });
    }
    let rest = reserved_total.saturating_sub(in_agents);
    if rest > 0 {
        record.owners.push(Owner {
            vm: 0,
            agent: NO_AGENT,
            amount: rest,
            count: 0,
        });
    }
    record
}

/// Reservations of Envoys that died, expired charged: (amount, count).
pub fn expired(flat: &[&str]) -> (Amount, u32) {
    let mut out = (0, 0);
    for (field, value) in pairs(flat) {
        match field {
            "expired" => out.0 = number(value),
            "expiredn" => out.1 = u32::try_from(number(value)).unwrap_or(u32::MAX),
            _ => {}
        }
    }
    out
}

fn counter(index: u32, flat: &[&str]) -> (WindowCounter, Amount) {
    let mut c = WindowCounter {
        index,
        ..WindowCounter::default()
    };
    let mut reserved = 0;
    for (field, value) in pairs(flat) {
        match field {
            "spent" => c.spent = number(value),
            "reserved" => reserved = number(value),
            "alerts" => c.alerts = u8::try_from(number(value)).unwrap_or(0),
            _ => {}
        }
    }
    (c, reserved)
}

/// The tenant's day and month as the shared-data ledger keeps them.
pub fn windows_record(day: &[&str], month: &[&str], now_secs: u64) -> WindowsRecord {
    let (day, reserved) = counter(day_index(now_secs), day);
    let (month, _) = counter(month_index(now_secs), month);
    WindowsRecord {
        day,
        month,
        owners: if reserved > 0 {
            vec![WindowOwner {
                vm: 0,
                amount: reserved,
                count: 0,
            }]
        } else {
            Vec::new()
        },
    }
}

/// One session read from Redis.
#[derive(Debug, Clone)]
pub struct RemoteSession {
    pub budget: BudgetRecord,
    pub report: ReportRecord,
    /// Entries worth merging into one in Redis.
    pub compaction: Option<Compaction>,
}

fn session_from(
    tenant: &str,
    id: &str,
    flat: &[&str],
    entries: &[&str],
    max_agents: u16,
) -> RemoteSession {
    let mut report = merge_entries(id, entries, max_agents);
    let budget = budget_record(id, flat);
    let compaction = (entries.len() > 1).then(|| Compaction {
        key: report_key(tenant, id),
        n: entries.len(),
        head: entries.first().map_or(String::new(), |h| h.to_string()),
        merged: merged_entry(&report),
    });
    let (amount, count) = expired(flat);
    report.record_recovered(amount, count);
    RemoteSession {
        budget,
        report,
        compaction,
    }
}

/// The `read` answer: the session (None when Redis has nothing of it) and the windows.
pub fn read_answer(
    tenant: &str,
    id: &str,
    answer: &Value,
    now_secs: u64,
    max_agents: u16,
) -> (Option<RemoteSession>, WindowsRecord) {
    let flat = strings(answer.get("h"));
    let entries = strings(answer.get("r"));
    let windows = windows_record(
        &strings(answer.get("d")),
        &strings(answer.get("m")),
        now_secs,
    );
    if flat.is_empty() && entries.is_empty() {
        return (None, windows);
    }
    (
        Some(session_from(tenant, id, &flat, &entries, max_agents)),
        windows,
    )
}

/// The `list` answer: the newest sessions, how many the tenant has, the windows.
pub fn list_answer(
    tenant: &str,
    answer: &Value,
    now_secs: u64,
    max_agents: u16,
) -> (Vec<RemoteSession>, usize, WindowsRecord) {
    let windows = windows_record(
        &strings(answer.get("d")),
        &strings(answer.get("m")),
        now_secs,
    );
    let total = answer
        .get("total")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let sessions = match answer.get("s") {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|s| {
                let id = s.get("id")?.as_str()?;
                let flat = strings(s.get("h"));
                let entries = strings(s.get("r"));
                Some(session_from(tenant, id, &flat, &entries, max_agents))
            })
            .collect(),
        _ => Vec::new(),
    };
    (sessions, total, windows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ledger::report::CallStats;

    fn call(record: &mut ReportRecord, agent: &str, cost: Amount, at_ms: u64) {
        record.record_call(
            &CallStats {
                agent,
                parent: None,
                tool: Some("search"),
                endpoint: "api.tavily.com/search",
                model: None,
                cost,
                cache_hit: false,
                savings: 0,
                tokens: None,
                unconfirmed: false,
                unmetered: false,
                at_ms,
            },
            16,
        );
    }

    #[test]
    fn merging_a_list_in_any_compaction_state_counts_every_entry_once() {
        let mut deltas = Vec::new();
        for i in 0..5u64 {
            let mut d = ReportRecord::new("s");
            call(
                &mut d,
                if i % 2 == 0 { "a" } else { "b" },
                100 * (i + 1),
                i * 1000,
            );
            deltas.push(entry(i, &d));
        }
        let entries: Vec<&str> = deltas.iter().map(String::as_str).collect();
        let whole = merge_entries("s", &entries, 16);
        assert_eq!(whole.requests, 5);
        assert_eq!(whole.cost, 1500);
        // A reader compacts the first three; more pushes follow.
        let first = merge_entries("s", &entries[..3], 16);
        let merged = merged_entry(&first);
        let compacted: Vec<&str> = std::iter::once(merged.as_str())
            .chain(entries[3..].iter().copied())
            .collect();
        let again = merge_entries("s", &compacted, 16);
        assert_eq!(again.requests, whole.requests);
        assert_eq!(again.cost, whole.cost);
        assert_eq!(again.agents, whole.agents);
        assert_eq!(again.timeline, whole.timeline);
        // Garbage in a list is skipped, not fatal.
        let with_junk = [entries[0], "nonsense", "7:%%%"];
        assert_eq!(merge_entries("s", &with_junk, 16).requests, 1);
    }

    #[test]
    fn a_session_hash_reads_as_the_shared_data_ledgers_record() {
        let flat = [
            "spent",
            "700",
            "reserved",
            "300",
            "killed",
            "manual",
            "last",
            "99",
            "a:exec-*:spent",
            "400",
            "a:exec-*:reserved",
            "100",
            "a:exec-*:alerts",
            "1",
            "expired",
            "50",
            "expiredn",
            "1",
        ];
        let record = budget_record("s", &flat);
        assert_eq!(record.spent, 700);
        assert!(record.killed);
        assert_eq!(record.last_active, 99);
        assert_eq!(record.reserved(), 300);
        assert_eq!(record.agent_totals("exec-*"), (400, 100));
        assert_eq!(record.agents[0].alerts, 1);
        assert_eq!(expired(&flat), (50, 1));
        let windows = windows_record(&["spent", "40", "reserved", "5"], &["spent", "90"], 86_400);
        assert_eq!(
            (windows.day.spent, windows.month.spent, windows.reserved()),
            (40, 90, 5)
        );
    }

    #[test]
    fn a_read_answer_gives_the_session_its_compaction_and_the_expired_as_unconfirmed() {
        let mut d = ReportRecord::new("s");
        call(&mut d, "a", 100, 0);
        let e1 = entry(1, &d);
        let e2 = entry(2, &d);
        let answer = serde_json::json!({
            "h": ["spent", "250", "expired", "50", "expiredn", "1"],
            "r": [e1, e2],
            "d": [], "m": {},
        });
        let (session, _) = read_answer("acme", "s", &answer, 0, 16);
        let session = session.unwrap();
        assert_eq!(session.report.requests, 2);
        assert_eq!(session.report.cost, 250);
        assert_eq!(session.report.unconfirmed_amount, 50);
        let c = session.compaction.unwrap();
        assert_eq!((c.key.as_str(), c.n), ("pag0:rep:4:acme:s", 2));
        // The compaction holds the merged counts, not the expired charge (Redis keeps that).
        let back = merge_entries("s", &[c.merged.as_str()], 16);
        assert_eq!(back.cost, 200);
        let (none, _) = read_answer("acme", "s", &serde_json::json!({"h": {}, "r": {}}), 0, 16);
        assert!(none.is_none());
    }
}
