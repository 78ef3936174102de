//! The `webhook-inbox` binary: parse the command line, set up logs, run the subcommand.

use std::process::ExitCode;

use clap::Parser as _;
use webhook_inbox::cli::{self, Cli};

/// sled copies a leaf on every write, so the service allocates and frees a lot; glibc's
/// malloc took about a fifth of the server's CPU under load (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: the option after `mi_option_eager_commit_delay` (14 in
/// `libmimalloc-sys`) in `mimalloc.h`'s `mi_option_e`, in v2 and v3 alike; the sys crate does
/// not name it. A test below checks that the option it names has this one's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The environment variables mimalloc reads the purge delay from (the second is its older
/// name); either is honoured over [`return_freed_memory_at_once`].
const PURGE_DELAY_ENV: [&str; 2] = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"];

/// Has mimalloc give pages back to the OS as soon as they are free, unless
/// `MIMALLOC_PURGE_DELAY` (`configured`) says otherwise. By default it waits a second
/// (mimalloc v3), so memory a thread freed and stopped using (sled's recovery frees ~30 MB
/// on the thread that opened the store) stays resident: with 1 M deliveries stored, RSS under
/// load was 163–169 MiB without it and 141–148 MiB with it, at the same acks/s
/// (BENCHMARKS.md, sessions 17 and 19; docs/sizing.md). The systemd unit in `deploy/` used to
/// set the variable; the binary now does what it did, wherever it is started.
#[allow(unsafe_code)]
fn return_freed_memory_at_once(configured: Option<std::ffi::OsString>) {
    if configured.is_some() {
        return;
    }
    // SAFETY: sets one integer option that mimalloc reads whenever it next decides to
    // purge. mimalloc documents `mi_option_set` as not thread safe (a plain store), so it is
    // called first thing in `main`, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// The environment variable tokio reads for its worker count; honoured here too, over
/// [`runtime_threads`]'s default.
const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// Worker threads of the main runtime on `cores` cores, `configured` being the value of
/// `TOKIO_WORKER_THREADS` if set. The main runtime runs the dispatcher, the handlers and the
/// background work. The public and admin servers' actix workers are threads with runtimes
/// of their own beside it (`server.workers`, one per core by default), so a runtime with a
/// thread per core as well puts two busy threads on every core. Half the cores (at least
/// one) unless `TOKIO_WORKER_THREADS` says otherwise: on two cores, one thread here instead
/// of two took 4–7 % less CPU per delivery, acks up and runs keeping up (BENCHMARKS.md,
/// session 16).
fn runtime_threads(configured: Option<&str>, cores: usize) -> usize {
    configured
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or((cores / 2).max(1))
}

fn main() -> ExitCode {
    return_freed_memory_at_once(PURGE_DELAY_ENV.iter().find_map(std::env::var_os));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_threads(
            std::env::var(WORKER_THREADS_ENV).ok().as_deref(),
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let cli = Cli::parse();
        let otlp = cli::otlp_settings(&cli);
        if let Err(e) = webhook_inbox::telemetry::init(cli.log_format, otlp.as_ref()) {
            tracing::warn!(error = %e, "traces are not exported");
        }
        cli::run(cli).await
    })
}

#[cfg(test)]
mod tests {
    use super::{MI_OPTION_PURGE_DELAY, return_freed_memory_at_once, runtime_threads};

    /// The purge delay's value as mimalloc sees it.
    #[allow(unsafe_code)]
    fn purge_delay() -> std::os::raw::c_long {
        // SAFETY: reads one integer option; this is the only test in this binary that
        // touches mimalloc's options.
        unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
    }

    #[test]
    fn the_allocator_gives_freed_memory_back_at_once_unless_told_otherwise() {
        if super::PURGE_DELAY_ENV
            .iter()
            .any(|v| std::env::var_os(v).is_some())
        {
            // Whoever runs the tests chose a delay: nothing to compare with.
            return;
        }
        // mimalloc v3's default for `purge_delay` is 1000 ms, and no other option of its
        // has that default: the constant names the right option.
        assert_eq!(purge_delay(), 1000);
        return_freed_memory_at_once(Some("250".into()));
        assert_eq!(
            purge_delay(),
            1000,
            "an explicit setting is left to mimalloc"
        );
        return_freed_memory_at_once(None);
        assert_eq!(purge_delay(), 0);
    }

    #[test]
    fn half_the_cores_at_least_one_unless_the_environment_says_otherwise() {
        assert_eq!(runtime_threads(None, 1), 1);
        assert_eq!(runtime_threads(None, 2), 1);
        assert_eq!(runtime_threads(None, 8), 4);
        assert_eq!(runtime_threads(Some("3"), 2), 3);
        assert_eq!(runtime_threads(Some(" 6 "), 2), 6);
        // Not a positive count: the default.
        assert_eq!(runtime_threads(Some("0"), 8), 4);
        assert_eq!(runtime_threads(Some("many"), 8), 4);
    }
}
