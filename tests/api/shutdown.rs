//! SIGTERM against the real binary: stop accepting, finish the request in flight, exit 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use webhook_inbox::config::Config;
use webhook_inbox::verify::Source;

use crate::helpers::{Options, config_text};

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_zero() {
    let dir = tempfile::TempDir::new().expect("dir");
    let text = config_text(dir.path(), &Options::default());
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &text).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let mut logs = BufReader::new(child.stderr.take().expect("stderr"));
    let mut port = None;
    let mut line = String::new();
    while port.is_none() && logs.read_line(&mut line).expect("read log") > 0 {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["fields"]["message"] == "webhook-inbox serving"
        {
            port = v["fields"]["listen"]
                .as_str()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok());
        }
        line.clear();
    }
    let port = port.expect("the serving line names the bound port");
    // Keep draining the logs so the child never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = logs.read_to_string(&mut rest);
        rest
    });

    let config = Config::parse(&text, "t.toml").expect("config");
    let source = Source::from_config("credicorp", &config.sources["credicorp"], "t.toml", &|_| {
        None
    })
    .expect("source");
    let body = br#"{"type":"application.created","data":{"n":1}}"#;
    let mut request = format!(
        "POST /webhooks/credicorp HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in source.sign("msg_in_flight", body, SystemTime::now()) {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.write_all(request.as_bytes()).expect("headers");
    stream.write_all(&body[..10]).expect("half the body");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // Wait until the listener is closed: the signal has been handled.
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    stream.write_all(&body[10..]).expect("rest of the body");
    let mut response = String::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = stream.read_to_string(&mut response);
    assert!(
        response.starts_with("HTTP/1.1 202"),
        "in-flight request finished: {response}"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    let rest = drain.join().expect("logs");
    assert!(status.success(), "exit status {status:?}\n{rest}");
}
