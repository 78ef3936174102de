//! The console's pages, as maud templates: every interpolated value is escaped, so a body
//! or header a sender controls is shown as text, never markup. No script anywhere; forms
//! and links only, so the pages work with the keyboard and under `default-src 'self'`.

use maud::{DOCTYPE, Markup, html};

use super::console_url;
use crate::domain::fingerprint;
use crate::metrics::{ACTIVITY_MINUTES, ActivityKind};
use crate::operations::{DeliveryDetail, HandlerStatusView};
use crate::store::{DeliveryRecord, DeliveryStatus, DeliverySummary, JobState, JobStatus};

/// The statuses a delivery can be filtered by, as the API names them.
const STATUSES: [&str; 6] = [
    "pending",
    "running",
    "failed",
    "dead",
    "succeeded",
    "in_progress",
];

fn layout(title: &str, active: &str, csrf: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · webhook-inbox" }
                link rel="stylesheet" href="/console/console.css";
            }
            body {
                header {
                    span.brand { "webhook-inbox" }
                    @if let Some(csrf) = csrf {
                        nav aria-label="Console" {
                            @for (href, label) in [
                                ("/console/", "Overview"),
                                ("/console/deliveries", "Deliveries"),
                                ("/console/dead", "Dead letters"),
                                ("/console/handlers", "Handlers"),
                            ] {
                                a href=(href) aria-current=[(label == active).then_some("page")] { (label) }
                            }
                        }
                        form.inline method="post" action="/console/sign-out" {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// A page that only says something.
pub fn message(title: &str, text: &str) -> Markup {
    layout(
        title,
        "",
        None,
        html! { p { (text) } p { a href="/console/" { "Back to the console" } } },
    )
}

/// No admin token configured.
pub fn disabled() -> Markup {
    layout(
        "Console disabled",
        "",
        None,
        html! {
            p {
                "No admin token is configured, so the console (like the admin API) is off. "
                "Set the variable that " code { "admin.token_env" } " names and restart."
            }
        },
    )
}

/// The sign-in form, with an error after a wrong token.
pub fn sign_in(error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        "",
        None,
        html! {
            @if let Some(error) = error {
                p.error role="alert" { (error) }
            }
            form.stacked method="post" action="/console/sign-in" {
                label for="token" { "Admin token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// The overview: the last hour per source, the queue, dead letters, handlers.
pub fn overview(
    csrf: &str,
    sources: &[&str],
    activity: &[(String, Vec<[u64; 4]>)],
    queue_depth: usize,
    dead: usize,
    handlers: &[HandlerStatusView],
) -> Markup {
    let empty = vec![[0u64; 4]; ACTIVITY_MINUTES];
    let mut rows: Vec<(&str, &Vec<[u64; 4]>)> = sources
        .iter()
        .map(|s| {
            let minutes = activity
                .iter()
                .find(|(name, _)| name == s)
                .map_or(&empty, |(_, m)| m);
            (*s, minutes)
        })
        .collect();
    if let Some((_, minutes)) = activity.iter().find(|(name, _)| name == "_unknown") {
        rows.push(("(unknown source)", minutes));
    }
    layout(
        "Overview",
        "Overview",
        Some(csrf),
        html! {
            section.tiles {
                div.tile { span.figure #queue-depth { (queue_depth) } span { "queued" } }
                div.tile { a href="/console/dead" { span.figure #dead-letters { (dead) } span { "dead letters" } } }
                div.tile { span.figure { (handlers.iter().filter(|h| h.paused).count()) } span { "handlers paused" } }
            }
            h2 { "Last hour, per source" }
            p.legend {
                @for kind in ActivityKind::ALL {
                    span class=(format!("key {}", kind.name())) { (kind.name()) }
                }
            }
            div.scroll {
                table {
                    thead { tr { th { "source" } th { "per minute" } @for kind in ActivityKind::ALL { th.num { (kind.name()) } } } }
                    tbody {
                        @for (source, minutes) in &rows {
                            tr {
                                td { (source) }
                                td { (chart(source, minutes)) }
                                @for i in 0..4 {
                                    td.num { (minutes.iter().map(|m| m[i]).sum::<u64>()) }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Handlers" }
            (handler_table(csrf, handlers, false))
        },
    )
}

/// A stacked bar per minute, oldest left, drawn on the server.
fn chart(source: &str, minutes: &[[u64; 4]]) -> Markup {
    const W: usize = 4;
    const H: u64 = 40;
    let peak = minutes
        .iter()
        .map(|m| m.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    // (x, y, height, kind, count, minutes ago) of each segment; at least 1 px for a count.
    let mut bars = Vec::new();
    for (i, minute) in minutes.iter().enumerate() {
        let mut top = H;
        for (k, kind) in ActivityKind::ALL.iter().enumerate() {
            if minute[k] == 0 {
                continue;
            }
            let h = (minute[k] * H / peak).max(1).min(top);
            top -= h;
            bars.push((i * W, top, h, kind.name(), minute[k], minutes.len() - i));
        }
    }
    let width = minutes.len() * W;
    html! {
        svg.chart width=(width) height=(H) viewBox=(format!("0 0 {width} {H}")) role="img"
            aria-label=(format!("{source}: deliveries per minute over the last hour")) {
            @for (x, y, h, kind, count, ago) in bars {
                rect class=(kind) x=(x) y=(y) width=(W - 1) height=(h) {
                    title { (count) " " (kind) ", " (ago) " min ago" }
                }
            }
        }
    }
}

fn handler_table(csrf: &str, handlers: &[HandlerStatusView], buttons: bool) -> Markup {
    html! {
        div.scroll {
            table #handlers {
                thead { tr {
                    th { "handler" } th { "state" } th.num { "due" } th.num { "waiting" }
                    th.num { "running" } th.num { "failed" } th.num { "dead" } th { "last error" }
                    @if buttons { th { "" } }
                } }
                tbody {
                    @for h in handlers {
                        tr data-handler=(h.name) {
                            td { (h.name) }
                            td { @if h.paused { span.badge.paused { "paused" } } @else { span.badge { "running" } } }
                            td.num { (h.due) } td.num { (h.waiting) } td.num { (h.running) }
                            td.num { (h.failed) } td.num { (h.dead) }
                            td.error-text { (h.last_error.as_deref().unwrap_or("")) }
                            @if buttons {
                                td {
                                    @let action = if h.paused { "resume" } else { "pause" };
                                    form.inline method="post" action=(console_url(&["handlers", &h.name, action], &[])) {
                                        input type="hidden" name="csrf" value=(csrf);
                                        button type="submit" name="do" value=(action) { (if h.paused { "Resume" } else { "Pause" }) " " (h.name) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What a backfill did, shown on the handlers page after it.
pub struct BackfillResult<'a> {
    /// The handler.
    pub handler: &'a str,
    /// Pairs bound (or, dry, that would be).
    pub bound: usize,
    /// Deliveries it had a pair with already.
    pub already: usize,
    /// Nothing was bound.
    pub dry_run: bool,
}

/// The handlers, with pause and resume, and the backfill form.
pub fn handlers(
    csrf: &str,
    handlers: &[HandlerStatusView],
    sources: &[&str],
    result: Option<BackfillResult<'_>>,
) -> Markup {
    layout(
        "Handlers",
        "Handlers",
        Some(csrf),
        html! {
            p { "A paused handler starts no run, on any replica, until resumed; its deliveries are still accepted and queued." }
            (handler_table(csrf, handlers, true))
            h2 { "Backfill" }
            p { "Runs a handler over the deliveries already stored that it would bind today and has no pair with yet (one added after they arrived). A second backfill binds nothing new." }
            @if let Some(r) = result {
                p.notice #backfill-result {
                    @if r.dry_run {
                        (r.handler) ": would bind " (r.bound) ", already bound " (r.already) " (dry run: nothing bound)."
                    } @else {
                        (r.handler) ": bound " (r.bound) ", already bound " (r.already) "."
                    }
                }
            }
            form.filters #backfill method="post" action="/console/backfill" {
                input type="hidden" name="csrf" value=(csrf);
                label { "handler " select name="handler" {
                    @for h in handlers { option value=(h.name) { (h.name) } }
                } }
                label { "source " select name="source" {
                    option value="" { "any" }
                    @for s in sources { option value=(s) { (s) } }
                } }
                label { "events " input type="text" name="events" placeholder="application.*"; }
                label { "since " input type="text" name="since" placeholder="2026-12-01T00:00:00Z"; }
                label { "until " input type="text" name="until" placeholder="now"; }
                label { input type="checkbox" name="dry_run" value="1"; " dry run" }
                button type="submit" { "Backfill" }
            }
        },
    )
}

/// The filters of the deliveries page, as given.
pub struct Filters<'a> {
    /// Source name, or empty.
    pub source: &'a str,
    /// Status name, or empty.
    pub status: &'a str,
    /// Event type, exact or `prefix*`, or empty.
    pub event_type: &'a str,
    /// Id prefix, or empty.
    pub id_prefix: &'a str,
}

fn delivery_href(record: &DeliveryRecord) -> String {
    console_url(&["deliveries", &record.source, &record.id], &[])
}

fn status_name(status: DeliveryStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn delivery_rows(deliveries: &[DeliverySummary]) -> Markup {
    html! {
        div.scroll {
            table #deliveries {
                thead { tr { th { "received" } th { "source" } th { "id" } th { "event type" } th { "status" } } }
                tbody {
                    @for d in deliveries {
                        tr {
                            td { time { (crate::clock::rfc3339_ms(d.record.received_at_ms)) } }
                            td { (d.record.source) }
                            td { a href=(delivery_href(&d.record)) { (d.record.id) } }
                            td { (d.record.event_type.as_deref().unwrap_or("")) }
                            td { span class=(format!("badge {}", status_name(d.status))) { (status_name(d.status)) } }
                        }
                    }
                    @if deliveries.is_empty() {
                        tr { td colspan="5" { "Nothing here." } }
                    }
                }
            }
        }
    }
}

/// The deliveries, newest first, filtered, a page at a time.
pub fn deliveries(
    csrf: &str,
    sources: &[&str],
    filters: &Filters<'_>,
    deliveries: &[DeliverySummary],
    next: Option<&str>,
) -> Markup {
    layout(
        "Deliveries",
        "Deliveries",
        Some(csrf),
        html! {
            form.filters method="get" action="/console/deliveries" {
                label { "source " select name="source" {
                    option value="" { "any" }
                    @for s in sources { option value=(s) selected[*s == filters.source] { (s) } }
                } }
                label { "status " select name="status" {
                    option value="" { "any" }
                    @for s in STATUSES { option value=(s) selected[s == filters.status] { (s) } }
                } }
                label { "event type " input type="text" name="event_type" value=(filters.event_type) placeholder="application.*"; }
                label { "id prefix " input type="text" name="id_prefix" value=(filters.id_prefix); }
                button type="submit" { "Filter" }
            }
            (delivery_rows(deliveries))
            @if let Some(next) = next {
                p { a rel="next" href=(next) { "Older deliveries →" } }
            }
        },
    )
}

/// The body as a person reads it: pretty JSON, else the text, else its size.
fn readable_body(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_default(),
        Err(_) => match std::str::from_utf8(body) {
            Ok(text) => text.to_owned(),
            Err(_) => format!("({} bytes, not text)", body.len()),
        },
    }
}

fn job_status_name(state: Option<&JobState>) -> &'static str {
    match state.map(|s| s.status) {
        None | Some(JobStatus::Pending) => "pending",
        Some(JobStatus::Running) => "running",
        Some(JobStatus::Succeeded) => "succeeded",
        Some(JobStatus::Failed) => "failed",
        Some(JobStatus::Dead) => "dead",
    }
}

/// One delivery: what came in and what each handler did with it.
pub fn delivery(csrf: &str, detail: &DeliveryDetail) -> Markup {
    let DeliveryDetail {
        record,
        body,
        body_error,
        status,
        handlers: jobs,
    } = detail;
    let status = *status;
    let href = delivery_href(record);
    layout(
        &format!("Delivery {}", record.id),
        "Deliveries",
        Some(csrf),
        html! {
            dl.facts {
                dt { "source" } dd { (record.source) }
                dt { "id" } dd #delivery-id { (record.id) }
                dt { "status" } dd { span #status class=(format!("badge {}", status_name(status))) { (status_name(status)) } }
                dt { "received" } dd { (crate::clock::rfc3339_ms(record.received_at_ms)) }
                dt { "event type" } dd { (record.event_type.as_deref().unwrap_or("")) }
                dt { "body SHA-256" } dd { code { (record.fingerprint) } }
                @if let Some(first) = &record.alias_of {
                    dt { "same body as" } dd { (first) " (nothing ran for this id)" }
                }
            }
            div.actions {
                form.inline method="post" action=(format!("{href}/retry")) {
                    input type="hidden" name="csrf" value=(csrf);
                    button #retry type="submit" { "Retry failed and dead handlers" }
                }
                a.button href=(format!("{href}/fixture")) download { "Download as fixture" }
            }
            h2 { "Handlers" }
            div.scroll {
                table #jobs {
                    thead { tr { th { "handler" } th { "status" } th.num { "attempts" } th { "last error" } th { "updated" } th { "idempotency key" } } }
                    tbody {
                        @for job in jobs {
                            @let state = &job.state;
                            tr data-handler=(job.name) {
                                td { (job.name) }
                                td { span class=(format!("badge {}", job_status_name(state.as_ref()))) { (job_status_name(state.as_ref())) } }
                                td.num.attempts { (state.as_ref().map_or(0, |s| s.attempts)) }
                                td.error-text { (state.as_ref().and_then(|s| s.last_error.as_deref()).unwrap_or("")) }
                                td { (state.as_ref().filter(|s| s.updated_ms > 0).map(|s| crate::clock::rfc3339_ms(s.updated_ms)).unwrap_or_default()) }
                                td { code { (job.idempotency_key) } }
                            }
                        }
                        @if jobs.is_empty() {
                            tr { td colspan="6" { "No handler is bound to this delivery." } }
                        }
                    }
                }
            }
            @if jobs.iter().any(|j| !j.steps.is_empty()) {
                h2 { "Downstream calls" }
                div.scroll {
                    table #steps {
                        thead { tr { th { "handler" } th { "step" } th { "request" } th.num { "status" } th.num { "attempts" } th { "when" } th.num { "replayed" } th { "idempotency key" } } }
                        tbody {
                            @for job in jobs {
                                @for step in &job.steps {
                                    tr data-handler=(job.name) data-step=(step.step) {
                                        td { (job.name) }
                                        td { (step.step) }
                                        td { code { (step.request) } }
                                        td.num { (step.status) }
                                        td.num { (step.attempts) }
                                        td { (step.at) }
                                        td.num.replayed { (step.replayed) }
                                        td { code { (step.idempotency_key) } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Headers" }
            div.scroll {
                table #headers {
                    tbody {
                        @for (name, value) in &record.headers.0 {
                            tr { th scope="row" { (name) } td { code { (value) } } }
                        }
                    }
                }
            }
            h2 { "Body" }
            @if let Some(error) = body_error {
                p #body-error { (error) }
            } @else {
                p.muted { (body.len()) " bytes; SHA-256 " code { (fingerprint(body)) } }
                pre #body { (readable_body(body)) }
            }
        },
    )
}

/// The filters of the dead letters page, as given.
pub struct DeadFilters<'a> {
    /// Source name, or empty.
    pub source: &'a str,
    /// Handler name, or empty.
    pub handler: &'a str,
    /// RFC 3339, or empty.
    pub since: &'a str,
    /// RFC 3339, or empty.
    pub until: &'a str,
}

/// Dead letters, with a bulk retry of what the filters select.
pub fn dead_letters(
    csrf: &str,
    sources: &[&str],
    handlers: &[&str],
    filters: &DeadFilters<'_>,
    deliveries: &[DeliverySummary],
    retried: Option<usize>,
) -> Markup {
    let fields = |with_csrf: bool| {
        html! {
            @if with_csrf { input type="hidden" name="csrf" value=(csrf); }
            label { "source " select name="source" {
                option value="" { "any" }
                @for s in sources { option value=(s) selected[*s == filters.source] { (s) } }
            } }
            label { "handler " select name="handler" {
                option value="" { "any" }
                @for h in handlers { option value=(h) selected[*h == filters.handler] { (h) } }
            } }
            label { "since " input type="text" name="since" value=(filters.since) placeholder="2026-11-28T09:00:00Z"; }
            label { "until " input type="text" name="until" value=(filters.until); }
        }
    };
    layout(
        "Dead letters",
        "Dead letters",
        Some(csrf),
        html! {
            @if let Some(n) = retried {
                p.notice role="status" #retried { (n) " pair(s) requeued." }
            }
            form.filters method="get" action="/console/dead" {
                (fields(false))
                button type="submit" { "Filter" }
            }
            form.filters method="post" action="/console/retry" {
                (fields(true))
                button #retry-all type="submit" { "Retry every dead pair these filters select" }
            }
            (delivery_rows(deliveries))
        },
    )
}
