//! `rollout status`: where each wave stands, the blocked hosts, and a final summary, rendered as
//! text, Markdown or HTML. [`view`] is pure; the renderers only format it.

use jiff::{SignedDuration, Timestamp};

use super::journal::{decide_next, Decision, HostStatus, Progress};
use super::{human_ms, Plan};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveView {
    pub name: String,
    /// `not started`, `in progress`, `burning in`, `done`, `halted`.
    pub state: &'static str,
    pub done: Vec<String>,
    pub failed: Vec<String>,
    pub pending: Vec<String>,
    pub burn_time_ms: u64,
    /// While burning in: how much is left.
    pub burn_remaining_ms: Option<u64>,
    pub started_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusView {
    pub plan: Plan,
    pub signed: bool,
    pub entries: usize,
    pub now: Timestamp,
    pub waves: Vec<WaveView>,
    /// `rollout next`'s answer now, in one line.
    pub next: String,
    /// When every host is recorded ok, or a host failed: what to tell the team.
    pub summary: Option<String>,
}

pub fn view(plan: &Plan, progress: &Progress, entries: usize, signed: bool, now: Timestamp) -> StatusView {
    let decision = decide_next(plan, progress, now);
    let mut waves = Vec::new();
    for (wave, p) in plan.waves.iter().zip(&progress.waves) {
        let by = |s: HostStatus| wave.hosts.iter().filter(|h| p.records.get(*h).is_some_and(|r| r.status == s)).cloned().collect::<Vec<_>>();
        let (done, failed) = (by(HostStatus::Ok), by(HostStatus::Failed));
        let pending: Vec<String> = wave.hosts.iter().filter(|h| !p.records.contains_key(*h)).cloned().collect();
        let last = p.records.values().map(|r| r.time).max();
        let burn_end = last.map(|t| t + SignedDuration::from_millis(wave.burn_time_ms as i64));
        let burn_remaining_ms = match burn_end {
            Some(end) if pending.is_empty() && failed.is_empty() && end > now => Some(end.duration_since(now).as_millis() as u64),
            _ => None,
        };
        let state = if !failed.is_empty() {
            "halted"
        } else if p.started_at.is_none() {
            "not started"
        } else if !pending.is_empty() {
            "in progress"
        } else if burn_remaining_ms.is_some() {
            "burning in"
        } else {
            "done"
        };
        waves.push(WaveView { name: wave.name.clone(), state, done, failed, pending, burn_time_ms: wave.burn_time_ms, burn_remaining_ms, started_at: p.started_at });
    }
    let summary = summary(plan, progress, &decision, &waves);
    StatusView { plan: plan.clone(), signed, entries, now, waves, next: decision.reason(plan, now), summary }
}

fn summary(plan: &Plan, progress: &Progress, decision: &Decision, waves: &[WaveView]) -> Option<String> {
    let blocked = if plan.blocked.is_empty() {
        "No host was left out.".to_string()
    } else {
        format!(
            "{} host(s) were left out because the lab did not pass their platform and need another qualification: {}.",
            plan.blocked.len(),
            plan.blocked.iter().map(|b| format!("{} ({})", b.host, b.platform)).collect::<Vec<_>>().join(", ")
        )
    };
    match decision {
        Decision::Done => {
            let first = progress.waves.iter().filter_map(|w| w.started_at).min();
            let last = progress.waves.iter().flat_map(|w| w.records.values().map(|r| r.time)).max();
            let burn = waves.last().and_then(|w| w.burn_remaining_ms).map(|ms| format!(" The last wave is still burning in for {}.", human_ms(ms))).unwrap_or_default();
            Some(format!(
                "Rollout complete: {} host(s) patched in {} wave(s) ({}), from {} to {}, with no failure, on the strength of report {} (run {}, sha256 {}).{burn} {blocked}",
                plan.host_count(),
                plan.waves.len(),
                plan.waves.iter().map(|w| w.name.as_str()).collect::<Vec<_>>().join(", "),
                first.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
                last.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
                plan.report.file,
                plan.report.run_id,
                plan.report.sha256,
            ))
        }
        Decision::Halted { wave, failed } => {
            let patched: usize = waves.iter().map(|w| w.done.len()).sum();
            Some(format!(
                "Rollout halted in wave {}: {} failed; {patched} host(s) patched so far, no further wave will start. Investigate, then qualify and plan again. {blocked}",
                plan.waves[*wave].name,
                failed.join(", ")
            ))
        }
        _ => None,
    }
}

fn list(hosts: &[String]) -> String {
    if hosts.is_empty() {
        "-".into()
    } else {
        hosts.join(", ")
    }
}

fn burn(w: &WaveView) -> String {
    match w.burn_remaining_ms {
        Some(ms) => format!("{}, {} left", human_ms(w.burn_time_ms), human_ms(ms)),
        None => human_ms(w.burn_time_ms),
    }
}

pub fn render_text(v: &StatusView) -> String {
    let p = &v.plan;
    let mut out = String::new();
    out.push_str(&format!("report:    {} (run {}, sha256 {})\n", p.report.file, p.report.run_id, p.report.sha256));
    out.push_str(&format!("inventory: {} (sha256 {})\n", p.inventory.file, p.inventory.sha256));
    out.push_str(&format!("plan:      created {}, {}\n", p.created_at, if v.signed { "signed (plan.json.sig)" } else { "unsigned" }));
    out.push_str(&format!("journal:   {} entries, chain verified\n\n", v.entries));
    for (i, w) in v.waves.iter().enumerate() {
        out.push_str(&format!("wave {} {}: {} (burn time {})\n", i + 1, w.name, w.state, burn(w)));
        out.push_str(&format!("  done:    {}\n  failed:  {}\n  pending: {}\n", list(&w.done), list(&w.failed), list(&w.pending)));
    }
    if p.waves.is_empty() {
        out.push_str("no waves: no host may be patched\n");
    }
    out.push_str(&format!("\nblocked: {}\n", p.blocked.len()));
    for b in &p.blocked {
        out.push_str(&format!("  {} ({}, {}): {}\n", b.host, b.platform, b.criticality, b.reason));
    }
    out.push_str(&format!("\nnext: {}\n", v.next));
    if let Some(s) = &v.summary {
        out.push_str(&format!("\n{s}\n"));
    }
    out
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

pub fn render_md(v: &StatusView) -> String {
    let p = &v.plan;
    let mut out = String::from("# Rollout status\n\n");
    out.push_str(&format!("- Report: `{}` (run `{}`, sha256 `{}`)\n", p.report.file, p.report.run_id, p.report.sha256));
    out.push_str(&format!("- Inventory: `{}` (sha256 `{}`)\n", p.inventory.file, p.inventory.sha256));
    out.push_str(&format!("- Plan: created {}, {}\n", p.created_at, if v.signed { "signed" } else { "unsigned" }));
    out.push_str(&format!("- Journal: {} entries, chain verified\n- Next: {}\n\n", v.entries, md_cell(&v.next)));
    out.push_str("| wave | state | done | failed | pending | burn time |\n|---|---|---|---|---|---|\n");
    for w in &v.waves {
        out.push_str(&format!("| {} | {} | {} | {} | {} | {} |\n", w.name, w.state, md_cell(&list(&w.done)), md_cell(&list(&w.failed)), md_cell(&list(&w.pending)), burn(w)));
    }
    out.push_str(&format!("\n## Blocked hosts ({})\n\n", p.blocked.len()));
    if p.blocked.is_empty() {
        out.push_str("None.\n");
    } else {
        out.push_str("| host | platform | criticality | reason |\n|---|---|---|---|\n");
        for b in &p.blocked {
            out.push_str(&format!("| {} | {} | {} | {} |\n", b.host, b.platform, b.criticality, md_cell(&b.reason)));
        }
    }
    if let Some(s) = &v.summary {
        out.push_str(&format!("\n## Summary\n\n{s}\n"));
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub fn render_html(v: &StatusView) -> String {
    let p = &v.plan;
    let mut out = String::from("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Rollout status</title></head><body>\n<h1>Rollout status</h1>\n<ul>\n");
    out.push_str(&format!("<li>Report: <code>{}</code> (run <code>{}</code>, sha256 <code>{}</code>)</li>\n", esc(&p.report.file), esc(&p.report.run_id), esc(&p.report.sha256)));
    out.push_str(&format!("<li>Inventory: <code>{}</code> (sha256 <code>{}</code>)</li>\n", esc(&p.inventory.file), esc(&p.inventory.sha256)));
    out.push_str(&format!("<li>Plan: created {}, {}</li>\n", esc(&p.created_at), if v.signed { "signed" } else { "unsigned" }));
    out.push_str(&format!("<li>Journal: {} entries, chain verified</li>\n<li>Next: {}</li>\n</ul>\n", v.entries, esc(&v.next)));
    out.push_str("<table>\n<tr><th>wave</th><th>state</th><th>done</th><th>failed</th><th>pending</th><th>burn time</th></tr>\n");
    for w in &v.waves {
        out.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&w.name),
            w.state,
            esc(&list(&w.done)),
            esc(&list(&w.failed)),
            esc(&list(&w.pending)),
            esc(&burn(w))
        ));
    }
    out.push_str(&format!("</table>\n<h2>Blocked hosts ({})</h2>\n", p.blocked.len()));
    if p.blocked.is_empty() {
        out.push_str("<p>None.</p>\n");
    } else {
        out.push_str("<table>\n<tr><th>host</th><th>platform</th><th>criticality</th><th>reason</th></tr>\n");
        for b in &p.blocked {
            out.push_str(&format!("<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n", esc(&b.host), esc(&b.platform), esc(&b.criticality), esc(&b.reason)));
        }
        out.push_str("</table>\n");
    }
    if let Some(s) = &v.summary {
        out.push_str(&format!("<h2>Summary</h2>\n<p>{}</p>\n", esc(s)));
    }
    out.push_str("</body></html>\n");
    out
}
