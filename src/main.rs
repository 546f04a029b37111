//! The `agent` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, Signal, SignalKind};

use agent::config::{Config, LogFormat};

/// Exit code for configuration errors, as documented in the README.
const EXIT_CONFIG: u8 = 2;
const EXIT_RUNTIME: u8 = 1;

#[derive(Parser)]
#[command(
    name = "agent",
    version,
    about = "Node agent: peers, storage and Prometheus metrics"
)]
struct Cli {
    /// Configuration file (default: ./agent.yaml when present).
    #[arg(short, long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration and print it, environment overrides applied.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, resolved) = match Config::load(cli.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            print!("{}", config.to_yaml());
            ExitCode::SUCCESS
        }
        Command::Run => run(config, resolved),
    }
}

fn run(config: Config, resolved: agent::config::Resolved) -> ExitCode {
    return_large_allocations_to_the_os();
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    // Registered before the agent starts serving, so that from "agent ready"
    // on no handled signal can take its default action (killing the process
    // without a drain).
    let signals = {
        let _context = runtime.enter();
        match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("agent: cannot install signal handlers: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    };
    let result = runtime.block_on(agent::app::run(config, resolved, signals.shutdown()));
    // Connections that ignored the drain deadline must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr, like configuration errors; not also a log line.
            eprintln!("agent: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Makes glibc serve every allocation of 128 KiB or more with its own
/// mapping, returned to the OS when freed. By default the threshold rises
/// to the largest block freed so far (up to 32 MiB), after which large
/// message buffers come from the heap arenas and their memory stays with
/// the process: after 400 peers exchanged 1 MiB messages and closed, the
/// agent kept about 490 MiB resident. Setting the threshold explicitly
/// turns that adjustment off.
fn return_large_allocations_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; it runs before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG, when set, wins over log.level (validated at load).
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never into journald or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The signals the agent handles. Once registered, a signal no longer takes
/// its default action, even after every stream is dropped: SIGUSR1, SIGUSR2
/// and SIGQUIT would otherwise kill the agent mid-request, without a drain.
struct Signals {
    term: Signal,
    int: Signal,
    /// Logged and otherwise ignored; the agent has no use for them.
    ignored: [(&'static str, Signal); 3],
}

impl Signals {
    /// Registers the handlers; must run inside the runtime.
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            ignored: [
                ("SIGUSR1", signal(SignalKind::user_defined1())?),
                ("SIGUSR2", signal(SignalKind::user_defined2())?),
                ("SIGQUIT", signal(SignalKind::quit())?),
            ],
        })
    }

    /// Resolves on SIGTERM or SIGINT, logging each ignored signal meanwhile.
    async fn shutdown(mut self) {
        let [(usr1, s1), (usr2, s2), (quit, s3)] = &mut self.ignored;
        loop {
            let (name, stop) = tokio::select! {
                _ = self.term.recv() => ("SIGTERM", true),
                _ = self.int.recv() => ("SIGINT", true),
                _ = s1.recv() => (*usr1, false),
                _ = s2.recv() => (*usr2, false),
                _ = s3.recv() => (*quit, false),
            };
            if stop {
                tracing::info!("received {name}");
                return;
            }
            tracing::warn!("received {name}; ignored (SIGTERM or SIGINT stops the agent)");
        }
    }
}
