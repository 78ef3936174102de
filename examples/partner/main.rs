//! The partner simulator: an HTTP API that applies design.md's idempotency rules to its own
//! writes (one key per operation, the first answer replayed, 422 for a reused key with
//! another request, 409 while the first is in flight), with faults to inject and a count of
//! actions per key. See `simulator.rs` for the rules and README's "Calling partners".
//!
//! ```text
//! cargo run --example partner -- --listen 127.0.0.1:9300 [--ignore-keys] [--fault act-then-drop]…
//! curl -s localhost:9300/_sim/actions
//! ```

mod simulator;

use std::net::SocketAddr;

use clap::Parser;

/// A partner API for trying webhook-inbox's downstream calls.
#[derive(Debug, Parser)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:9300")]
    listen: SocketAddr,
    /// Act on every request, whatever its key (a partner without idempotency).
    #[arg(long)]
    ignore_keys: bool,
    /// A fault for the next write, in order (repeatable): act-then-drop, act-then-500,
    /// 429:<seconds>, 429-date:<seconds>, slow:<ms>.
    #[arg(long = "fault")]
    faults: Vec<simulator::Fault>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let partner = simulator::Partner::start(args.listen, args.ignore_keys).await?;
    for fault in args.faults {
        partner.push_fault(fault);
    }
    println!("partner simulator on {}", partner.url());
    tokio::signal::ctrl_c().await?;
    println!("actions: {:?}", partner.actions_per_key());
    Ok(())
}
