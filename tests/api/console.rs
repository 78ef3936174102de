//! The web console (design.md, "Web console"), in a real headless Chromium driven over
//! WebDriver (ChromeDriver), against the real service: sign-in, the deliveries list and its
//! filters, one delivery and its retry, pause and resume, bulk retry of dead letters, an
//! attacker's `<script>` shown as text, and a POST without the CSRF token refused. On a
//! failure, a screenshot of the page is written under the test's temp dir (the path is
//! printed). `.ci/run` installs `chromium` and `chromium-driver`; without them the browser
//! test says it is skipped, unless `WEBHOOK_INBOX_TEST_BROWSER=required`.
//!
//! With `WEBHOOK_INBOX_CONSOLE_SCREENSHOTS=<dir>`, the overview and a delivery are saved
//! there as PNG (how `docs/console-*.png` are made).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt as _;
use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError, Registration};

use crate::helpers::{Options, TestApp, eventually, spawn_with};

/// A downstream that refuses (for good) while `refuse` is set, and records what ran.
#[derive(Clone, Default)]
struct Downstream {
    refuse: Arc<AtomicBool>,
    ran: Arc<Mutex<Vec<String>>>,
}

impl Downstream {
    fn ran(&self, id: &str) -> bool {
        self.ran.lock().expect("lock").iter().any(|r| r == id)
    }
}

#[async_trait]
impl Handler for Downstream {
    async fn handle(&self, d: &Delivery, _: &HandlerContext) -> Result<(), HandlerError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(HandlerError::Permanent("downstream refused: 400".into()));
        }
        self.ran.lock().expect("lock").push(d.id.clone());
        Ok(())
    }
}

/// ChromeDriver and a Chromium session, each with its own profile directory.
struct Browser {
    driver: Child,
    client: Client,
    /// The browser profile, removed with the session.
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn find(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// Starts ChromeDriver and a headless Chromium; `None` (with a line saying so) when they
/// are not installed and the browser tests are not required.
async fn browser(test: &str) -> Option<Browser> {
    let (Some(driver), Some(chromium)) = (
        find("chromedriver"),
        find("chromium").or_else(|| find("chromium-browser")),
    ) else {
        assert!(
            std::env::var("WEBHOOK_INBOX_TEST_BROWSER").as_deref() != Ok("required"),
            "WEBHOOK_INBOX_TEST_BROWSER=required but chromium or chromedriver is missing"
        );
        eprintln!("skipped {test}: chromium and chromedriver are not installed");
        return None;
    };
    let dir = tempfile::TempDir::new().expect("dir");
    // A free port for ChromeDriver (it takes no port 0).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let url = format!("http://127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(up, "chromedriver listens on {port}");
    let profile = dir.path().join("profile");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&url)
        .await
        .expect("a Chromium session");
    Some(Browser {
        driver: child,
        client,
        _profile: dir,
    })
}

impl Browser {
    /// The text of `css` once the page shows it (a page may still be loading after a
    /// click that submitted a form), for at most 30 s.
    async fn text(&self, css: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let found = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.text().await,
                Err(e) => Err(e),
            };
            match found {
                Ok(text) => return text,
                Err(e) if std::time::Instant::now() > deadline => panic!("{css} on the page: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Waits until `css` shows `expected` on the current page (no reload), for at most 30 s.
    async fn wait_text(&self, css: &str, expected: &str) {
        self.poll_text(None, css, expected).await;
    }

    /// Reloads `url` until `css` holds `expected`, for at most 30 s.
    async fn until_text(&self, url: &str, css: &str, expected: &str) {
        self.poll_text(Some(url), css, expected).await;
    }

    async fn poll_text(&self, reload: Option<&str>, css: &str, expected: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(url) = reload {
                self.client.goto(url).await.expect("goto");
            }
            let text = self.text(css).await;
            if text.contains(expected) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: {css} shows {text:?}, expected {expected:?}",
                reload.unwrap_or("the page")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks `css` and waits for the page it leads to (a form's answer) to load.
    async fn click(&self, css: &str) {
        let before = self
            .client
            .find(Locator::Css("html"))
            .await
            .expect("a page");
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css} on the page: {e}"))
            .click()
            .await
            .expect("click");
        // The old page's root goes stale once the new one has replaced it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while before.tag_name().await.is_ok() {
            assert!(std::time::Instant::now() < deadline, "{css} led nowhere");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The page loaded whole and from this server only: its stylesheet applied, every
    /// resource same-origin (nothing a CSP would block, nothing that would log an error).
    async fn page_is_whole(&self) {
        let report: serde_json::Value = self
            .client
            .execute(
                "return { sheets: Array.from(document.styleSheets).map(s => s.cssRules.length), \
                          foreign: performance.getEntriesByType('resource') \
                              .filter(r => new URL(r.name).origin !== location.origin).length, \
                          scripts: document.scripts.length }",
                vec![],
            )
            .await
            .expect("script");
        assert_eq!(report["foreign"], 0, "{report}");
        assert_eq!(report["scripts"], 0, "no script on the page: {report}");
        assert!(
            report["sheets"]
                .as_array()
                .is_some_and(|s| s.len() == 1 && s[0].as_u64() > Some(0)),
            "the stylesheet loaded: {report}"
        );
    }

    async fn screenshot(&self, path: &Path) {
        if let Ok(png) = self.client.screenshot().await {
            let _ = std::fs::write(path, png);
        }
    }
}

/// Polls `check` for at most 30 s.
async fn eventually_async_ok<F, Fut>(check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    crate::helpers::eventually_async(Duration::from_secs(30), check).await
}

/// Sends every credicorp fixture through the real endpoint.
async fn send_fixtures(app: &TestApp) -> Vec<String> {
    let mut ids = Vec::new();
    for path in
        webhook_inbox::fixture::collect(&[PathBuf::from("fixtures/credicorp")]).expect("fixtures")
    {
        let fixture = webhook_inbox::fixture::Fixture::load(&path).expect("fixture");
        let signed = fixture
            .sign(&app.config, std::time::SystemTime::now())
            .expect("signed");
        let response = app.post("credicorp", &signed.headers, signed.body).await;
        assert_eq!(response.status().as_u16(), 202, "{}", path.display());
        ids.push(fixture.id);
    }
    ids
}

async fn console_scenario(b: &Browser, app: &TestApp, downstream: &Downstream) {
    let console = format!("{}/console/", app.admin_address);
    // Signed out: the console sends you to the sign-in form; a wrong token says so.
    b.client.goto(&console).await.expect("goto");
    assert!(
        b.client
            .current_url()
            .await
            .expect("url")
            .as_str()
            .ends_with("/console/sign-in")
    );
    b.client
        .find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys("not-the-token")
        .await
        .expect("type");
    b.click("form button[type=submit]").await;
    assert!(b.text("p.error").await.contains("not the admin token"));
    // With the keyboard alone: the field has the focus, Enter submits.
    let before = b.client.find(Locator::Css("html")).await.expect("page");
    b.client
        .active_element()
        .await
        .expect("a focused element")
        .send_keys("admin-token\u{E007}")
        .await
        .expect("type");
    assert!(
        eventually_async_ok(|| async { before.tag_name().await.is_err() }).await,
        "Enter submitted the form"
    );
    b.wait_text("h1", "Overview").await;
    b.page_is_whole().await;

    // Fixtures through the real endpoint; the downstream refuses them all: dead letters.
    downstream.refuse.store(true, Ordering::SeqCst);
    let ids = send_fixtures(app).await;
    b.until_text(&console, "#dead-letters", &ids.len().to_string())
        .await;

    // The list, filtered by status `dead` with the form.
    b.client
        .goto(&format!("{}/console/deliveries", app.admin_address))
        .await
        .expect("goto");
    b.client
        .find(Locator::Css("select[name=status]"))
        .await
        .expect("status filter")
        .select_by_value("dead")
        .await
        .expect("select");
    b.click("form.filters button[type=submit]").await;
    let rows = b
        .client
        .find_all(Locator::Css("#deliveries tbody tr"))
        .await
        .expect("rows");
    assert_eq!(rows.len(), ids.len(), "every fixture is dead");

    // One delivery: open it, retry it, the new attempt succeeds.
    let first = &ids[0];
    b.click(&format!("#deliveries a[href$='/{first}']")).await;
    assert_eq!(b.text("#delivery-id").await, *first);
    assert_eq!(
        b.text("#jobs tr[data-handler=downstream] .badge").await,
        "dead"
    );
    let page = b.client.current_url().await.expect("url").to_string();
    if let Some(dir) = std::env::var_os("WEBHOOK_INBOX_CONSOLE_SCREENSHOTS") {
        b.screenshot(&Path::new(&dir).join("console-delivery.png"))
            .await;
    }
    downstream.refuse.store(false, Ordering::SeqCst);
    b.click("#retry").await;
    b.until_text(
        &page,
        "#jobs tr[data-handler=downstream] .badge",
        "succeeded",
    )
    .await;
    assert_eq!(
        b.text("#jobs tr[data-handler=downstream] .attempts").await,
        "2"
    );
    assert!(downstream.ran(first));

    // Pause: a delivery sent meanwhile runs the other handler, not this one; resume runs it.
    b.client
        .goto(&format!("{}/console/handlers", app.admin_address))
        .await
        .expect("goto");
    b.click("tr[data-handler=downstream] button").await;
    b.wait_text("tr[data-handler=downstream] .badge", "paused")
        .await;
    let paused_id = "msg_console_paused";
    assert_eq!(
        app.deliver(paused_id, "{\"type\":\"a\"}").await.status(),
        202
    );
    assert!(
        eventually(Duration::from_secs(10), || app.recorder.runs_of(paused_id)
            == 1)
        .await
    );
    assert!(!downstream.ran(paused_id), "a paused handler ran");
    b.click("tr[data-handler=downstream] button").await;
    b.wait_text("tr[data-handler=downstream] .badge", "running")
        .await;
    assert!(eventually(Duration::from_secs(10), || downstream.ran(paused_id)).await);

    // Bulk retry on the dead letters page, with its filters.
    let dead_page = format!("{}/console/dead", app.admin_address);
    b.client.goto(&dead_page).await.expect("goto");
    b.client
        .find(Locator::Css("form[method=post] select[name=handler]"))
        .await
        .expect("handler filter")
        .select_by_value("downstream")
        .await
        .expect("select");
    b.click("#retry-all").await;
    assert_eq!(
        b.text("#retried").await,
        format!("{} pair(s) requeued.", ids.len() - 1)
    );
    b.until_text(&console, "#dead-letters", "0").await;
    assert!(ids.iter().all(|id| downstream.ran(id)));
    if let Some(dir) = std::env::var_os("WEBHOOK_INBOX_CONSOLE_SCREENSHOTS") {
        b.screenshot(&Path::new(&dir).join("console-overview.png"))
            .await;
    }

    // An attacker's markup is text: no dialog, no script, the characters as sent.
    let evil = r#"{"type":"a","note":"<script>alert(1)</script><img src=x onerror=alert(2)>"}"#;
    assert_eq!(app.deliver("msg_console_evil", evil).await.status(), 202);
    b.client
        .goto(&format!(
            "{}/console/deliveries/credicorp/msg_console_evil",
            app.admin_address
        ))
        .await
        .expect("goto");
    assert!(b.text("#body").await.contains("<script>alert(1)</script>"));
    assert!(
        b.client.get_alert_text().await.is_err(),
        "a dialog opened: the body ran as markup"
    );
    let injected: serde_json::Value = b
        .client
        .execute(
            "return document.querySelectorAll('#body script, #body img').length",
            vec![],
        )
        .await
        .expect("script");
    assert_eq!(injected, serde_json::json!(0), "the body became elements");

    // A POST without the session's CSRF token is refused, with the session cookie itself.
    let cookie = b
        .client
        .get_named_cookie("webhook_inbox_console")
        .await
        .expect("session cookie");
    assert!(
        cookie.http_only().unwrap_or(false),
        "the session cookie is HttpOnly"
    );
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let forged = |csrf: Option<&str>| {
        let mut request = http
            .post(format!(
                "{}/console/handlers/downstream/pause",
                app.admin_address
            ))
            .header(
                "cookie",
                format!("webhook_inbox_console={}", cookie.value()),
            );
        if let Some(csrf) = csrf {
            request = request.form(&[("csrf", csrf)]);
        }
        request.send()
    };
    assert_eq!(forged(None).await.expect("sent").status(), 403);
    assert_eq!(forged(Some("0000")).await.expect("sent").status(), 403);
    let csrf = b
        .client
        .find(Locator::Css("input[name=csrf]"))
        .await
        .expect("csrf field")
        .attr("value")
        .await
        .expect("value")
        .expect("a token");
    assert_eq!(
        forged(Some(&csrf)).await.expect("sent").status(),
        303,
        "with the token it works"
    );

    // On a phone's width every page fits (tables scroll inside their box).
    b.client.set_window_size(390, 844).await.expect("resize");
    for path in [
        "/console/".to_owned(),
        "/console/deliveries".to_owned(),
        format!("/console/deliveries/credicorp/{first}"),
        "/console/dead".to_owned(),
        "/console/handlers".to_owned(),
    ] {
        b.client
            .goto(&format!("{}{path}", app.admin_address))
            .await
            .expect("goto");
        b.page_is_whole().await;
        let overflow: serde_json::Value = b
            .client
            .execute(
                "return document.documentElement.scrollWidth - window.innerWidth",
                vec![],
            )
            .await
            .expect("script");
        assert!(
            overflow.as_i64().is_some_and(|o| o <= 1),
            "{path} is wider than a phone: {overflow}"
        );
    }
    b.client.set_window_size(1280, 900).await.expect("resize");

    // Sign out ends the session.
    b.click("header form button").await;
    b.client.goto(&console).await.expect("goto");
    assert!(
        b.client
            .current_url()
            .await
            .expect("url")
            .as_str()
            .ends_with("/console/sign-in")
    );
}

/// The whole console in a real browser (see the module docs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let Some(b) = browser("the console in a real browser").await else {
        return;
    };
    let downstream = Downstream::default();
    let app = spawn_with(Options {
        admin_token: Some("admin-token"),
        handlers: vec![Registration::new("downstream", downstream.clone()).source("credicorp")],
        ..Options::default()
    })
    .await;
    let outcome = std::panic::AssertUnwindSafe(console_scenario(&b, &app, &downstream))
        .catch_unwind()
        .await;
    if outcome.is_err() {
        // A temp dir of its own, kept past the test, for the screenshot.
        let kept = tempfile::TempDir::new().expect("dir").keep();
        let shot = kept.join("failure.png");
        b.screenshot(&shot).await;
        let url = b
            .client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default();
        eprintln!(
            "console test failed on {url}; screenshot: {}",
            shot.display()
        );
    }
    // Ending the WebDriver session quits Chromium (killing ChromeDriver alone would leave
    // the browser running).
    let _ = b.client.clone().close().await;
    drop(b);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    app.stop().await;
}

/// Without a browser: the console's answers carry the security headers, a wrong token is
/// 401 with the form again, no token configured turns the console off, and pages need a
/// session.
#[tokio::test]
async fn the_console_is_locked_down_without_a_session_or_a_token() {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let app = spawn_with(Options {
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    let admin = &app.admin_address;
    for path in [
        "/console/",
        "/console/deliveries",
        "/console/dead",
        "/console/handlers",
    ] {
        let r = http
            .get(format!("{admin}{path}"))
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 303, "{path}");
        assert_eq!(r.headers()["location"], "/console/sign-in", "{path}");
    }
    let page = http
        .get(format!("{admin}/console/sign-in"))
        .send()
        .await
        .expect("sent");
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .expect("text")
            .starts_with("default-src 'self'")
    );
    let css = http
        .get(format!("{admin}/console/console.css"))
        .send()
        .await
        .expect("sent");
    assert_eq!(css.status(), 200);
    assert!(css.headers().contains_key("content-security-policy"));
    let wrong = http
        .post(format!("{admin}/console/sign-in"))
        .form(&[("token", "admin-tokeN")])
        .send()
        .await
        .expect("sent");
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let right = http
        .post(format!("{admin}/console/sign-in"))
        .form(&[("token", "admin-token")])
        .send()
        .await
        .expect("sent");
    assert_eq!(right.status(), 303);
    let cookie = right.headers()["set-cookie"]
        .to_str()
        .expect("text")
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age="] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    // Signed in, bad requests get their error page, not a crash or an empty list.
    let session = cookie.split(';').next().expect("name=value").to_owned();
    let get = |path: &str| {
        http.get(format!("{admin}{path}"))
            .header("cookie", &session)
            .send()
    };
    for (path, status) in [
        ("/console/deliveries/credicorp/no-such-id", 404),
        ("/console/deliveries?status=bogus", 400),
        ("/console/deliveries?cursor=zz", 400),
        ("/console/dead?since=yesterday", 400),
        ("/console/deliveries?status=dead&id_prefix=x", 200),
    ] {
        let r = get(path).await.expect("sent");
        assert_eq!(r.status(), status, "{path}");
        assert!(
            r.headers().contains_key("content-security-policy"),
            "{path}"
        );
    }
    let page = get("/console/handlers")
        .await
        .expect("sent")
        .text()
        .await
        .expect("page");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token in the page")
        .to_owned();
    let unknown = http
        .post(format!("{admin}/console/handlers/no-such-handler/pause"))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("sent");
    assert_eq!(unknown.status(), 404);
    // A state-changing POST without a session is refused, not redirected into.
    let r = http
        .post(format!("{admin}/console/handlers/recorder/pause"))
        .form(&[("csrf", "x")])
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 403);
    app.stop().await;

    let off = spawn_with(Options::default()).await;
    let r = http
        .get(format!("{}/console/", off.admin_address))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 403);
    assert!(
        r.text()
            .await
            .expect("body")
            .contains("No admin token is configured")
    );
    off.stop().await;
}

/// Issue 22, item 6: sign-in attempts are throttled per client address (five at once, then
/// one per 12 s, right or wrong: 429 with `Retry-After`), and the session cookie is `Secure`
/// when the request came over HTTPS (a TLS-terminating proxy's `X-Forwarded-Proto`) or
/// `console.secure_cookie` says so.
#[tokio::test]
async fn sign_in_is_throttled_per_address_and_the_cookie_is_secure_over_https() {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let sign_in = |admin: String, token: &'static str, https: bool| {
        let mut request = http
            .post(format!("{admin}/console/sign-in"))
            .form(&[("token", token)]);
        if https {
            request = request.header("x-forwarded-proto", "https");
        }
        async move { request.send().await.expect("sent") }
    };
    let cookie_of =
        |r: &reqwest::Response| r.headers()["set-cookie"].to_str().expect("text").to_owned();

    let app = spawn_with(Options {
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    let admin = app.admin_address.clone();
    let plain = sign_in(admin.clone(), "admin-token", false).await;
    assert_eq!(plain.status(), 303);
    assert!(
        !cookie_of(&plain).contains("Secure"),
        "{}",
        cookie_of(&plain)
    );
    let https = sign_in(admin.clone(), "admin-token", true).await;
    assert_eq!(https.status(), 303);
    assert!(
        cookie_of(&https).ends_with("; Secure"),
        "{}",
        cookie_of(&https)
    );
    for n in 3..=webhook_inbox::routes::console::SIGN_IN_BURST {
        assert_eq!(
            sign_in(admin.clone(), "wrong", false).await.status(),
            401,
            "attempt {n}"
        );
    }
    for token in ["wrong", "admin-token"] {
        let refused = sign_in(admin.clone(), token, false).await;
        assert_eq!(refused.status(), 429, "{token}: past the burst");
        assert!(refused.headers().get("set-cookie").is_none());
        let retry_after: u64 = refused.headers()["retry-after"]
            .to_str()
            .expect("text")
            .parse()
            .expect("seconds");
        assert!((1..=12).contains(&retry_after), "{retry_after}");
    }
    app.stop().await;

    let configured = spawn_with(Options {
        admin_token: Some("admin-token"),
        extra_toml: "[console]\nsecure_cookie = true\n".into(),
        ..Options::default()
    })
    .await;
    let r = sign_in(configured.admin_address.clone(), "admin-token", false).await;
    assert_eq!(r.status(), 303);
    assert!(cookie_of(&r).ends_with("; Secure"), "{}", cookie_of(&r));
    configured.stop().await;
}
