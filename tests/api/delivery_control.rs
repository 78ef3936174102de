//! Delivery control (issue 15, the part built so far): a handler's `match` decides at claim
//! time which deliveries it is bound to.

use std::time::Duration;

use webhook_inbox::Registration;

use crate::helpers::{Options, Recorder, eventually, spawn_with};

fn application(id: &str, product: Option<&str>) -> String {
    let product = product.map_or(String::new(), |p| format!(r#","product":"{p}""#));
    format!(
        r#"{{"type":"application.created","data":{{"application":{{"application_id":"{id}"{product}}}}}}}"#
    )
}

/// Only deliveries whose body holds an allowed value at the pointer get a job for the
/// handler; the others are accepted and recorded without it (configured or plugin).
#[tokio::test]
async fn a_match_binds_only_the_deliveries_whose_body_holds_an_allowed_value() {
    let loans = Recorder::default();
    let app = spawn_with(Options {
        admin_token: Some("admin-token"),
        handlers: vec![
            Registration::new("loans", loans.clone())
                .source("credicorp")
                .matching_body(
                    "/data/application/product",
                    [
                        serde_json::json!("personal_loan"),
                        serde_json::json!("mortgage"),
                    ],
                ),
        ],
        extra_toml: r#"
[[handlers]]
name = "mortgages-only"
kind = "log"
source = "credicorp"
match = { "/data/application/product" = ["mortgage"] }
"#
        .into(),
        ..Options::default()
    })
    .await;
    let cases = [
        ("app_1", Some("personal_loan"), true, false),
        ("app_2", Some("mortgage"), true, true),
        ("app_3", Some("car_loan"), false, false),
        ("app_4", None, false, false),
    ];
    for (id, product, _, _) in cases {
        assert_eq!(
            app.deliver(id, &application(id, product))
                .await
                .status()
                .as_u16(),
            202
        );
    }
    // The recorder (bound to everything) saw all four; then the matched ones are known.
    assert!(eventually(Duration::from_secs(20), || app.recorder.runs().len() == 4).await);
    assert!(eventually(Duration::from_secs(20), || loans.runs().len() == 2).await);
    for (id, _, loan, mortgage) in cases {
        assert_eq!(loans.runs_of(id), usize::from(loan), "{id}");
        let shown: serde_json::Value = app
            .client
            .get(format!(
                "{}/admin/deliveries/credicorp/{id}",
                app.admin_address
            ))
            .bearer_auth("admin-token")
            .send()
            .await
            .expect("admin")
            .json()
            .await
            .expect("json");
        let handlers: Vec<&str> = shown["record"]["handlers"]
            .as_array()
            .expect("handlers")
            .iter()
            .filter_map(|h| h.as_str())
            .collect();
        assert_eq!(handlers.contains(&"loans"), loan, "{id}: {handlers:?}");
        assert_eq!(
            handlers.contains(&"mortgages-only"),
            mortgage,
            "{id}: {handlers:?}"
        );
    }
}
