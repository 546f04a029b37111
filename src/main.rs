//! The `agent` command line.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
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
    /// Read a password on standard input and print its bcrypt hash, for
    /// `basic_auth_users` in the metrics web config file.
    HashPassword,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `agent man > /usr/share/man/man1/agent.1`.
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // These need no configuration: they run where the agent is installed
    // or its web config is written, not where it runs.
    match cli.command {
        Some(Command::HashPassword) => return hash_password(),
        Some(Command::Completions { shell }) => {
            // Into a buffer first: `generate` panics on a write error.
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "agent", &mut out);
            return print_bytes(&out);
        }
        Some(Command::Man) => {
            let mut out = Vec::new();
            if let Err(e) = clap_mangen::Man::new(Cli::command()).render(&mut out) {
                eprintln!("agent: cannot render the manual page: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
            return print_bytes(&out);
        }
        _ => {}
    }
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
        Command::Run => run(config, resolved, cli.config),
        Command::HashPassword | Command::Completions { .. } | Command::Man => {
            unreachable!("handled before the configuration is loaded")
        }
    }
}

/// Writes to stdout; a closed pipe (`agent man | head`) is not an error.
fn print_bytes(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent: cannot write to standard output: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// bcrypt cost of `hash-password`: what the exporter-toolkit documentation
/// uses (docs/performance-history.md, "bcrypt checks"). The agent remembers a verified
/// credential, so the cost is paid once per scraper, not per scrape.
const BCRYPT_COST: u32 = 10;
/// The longest password bcrypt reads whole.
const BCRYPT_MAX_BYTES: usize = 72;

/// Reads one password (up to the first newline, which is not part of it)
/// from stdin and prints its bcrypt hash.
fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("agent: cannot read the password from standard input: {e}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        eprintln!("agent: empty password on standard input");
        return ExitCode::from(EXIT_CONFIG);
    }
    // bcrypt reads only the first 72 bytes: a longer password would be
    // accepted with anything after its 72nd byte.
    if password.len() > BCRYPT_MAX_BYTES {
        eprintln!(
            "agent: the password is {} bytes; bcrypt uses only the first {BCRYPT_MAX_BYTES}, \
             so choose one of at most {BCRYPT_MAX_BYTES} bytes",
            password.len()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    match bcrypt::hash(password, BCRYPT_COST) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agent: cannot hash the password: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn run(
    config: Config,
    resolved: agent::config::Resolved,
    config_file: Option<PathBuf>,
) -> ExitCode {
    return_large_allocations_to_the_os();
    let set_log_level = init_logging(&config);
    log_panics();
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
    let (hup, requests) = tokio::sync::mpsc::channel(1);
    let reload = agent::app::Reload {
        config_file,
        requests,
        set_log_level,
    };
    let result = runtime.block_on(agent::app::run(
        config,
        resolved,
        signals.shutdown(hup),
        reload,
    ));
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
/// turns that adjustment off. musl's allocator maps such blocks on its own
/// and has no `mallopt`.
#[allow(unsafe_code)]
fn return_large_allocations_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; it runs before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Installs the log subscriber; returns how to change `log.level` later
/// (a configuration reload).
fn init_logging(config: &Config) -> agent::app::SetLogLevel {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG, when set, wins over log.level (validated at load).
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never into journald or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // The handle's type depends on the format, hence one closure per format.
    macro_rules! setter {
        ($builder:expr) => {{
            let builder = $builder;
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level: &str| {
                if from_env {
                    return Err("RUST_LOG is set, and wins over log.level".to_string());
                }
                let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                handle.reload(filter).map_err(|e| e.to_string())
            }) as agent::app::SetLogLevel
        }};
    }
    match config.log.format {
        LogFormat::Text => setter!(builder.with_filter_reloading()),
        LogFormat::Json => setter!(builder.json().with_filter_reloading()),
    }
}

/// Sends panics to the log as one error line naming the thread and the
/// place, instead of raw text on stderr, so they reach journald or a JSON
/// log like any other error. Storage threads catch their panics and carry
/// on (docs/reliability.md); this line says where it happened.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("panic with a non-text payload");
        let thread = std::thread::current();
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = thread.name().unwrap_or("unnamed");
        // Captured only when RUST_BACKTRACE asks for it, as the default hook does.
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(thread, location, %backtrace, "thread panicked: {message}");
        } else {
            tracing::error!(thread, location, "thread panicked: {message}");
        }
    }));
}

/// The signals the agent handles. Once registered, a signal no longer takes
/// its default action, even after every stream is dropped: SIGUSR1, SIGUSR2
/// and SIGQUIT would otherwise kill the agent mid-request, without a drain.
struct Signals {
    term: Signal,
    int: Signal,
    /// Reloads the configuration.
    hup: Signal,
    /// Logged and otherwise ignored; the agent has no use for them.
    ignored: [(&'static str, Signal); 3],
}

impl Signals {
    /// Registers the handlers; must run inside the runtime.
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            ignored: [
                ("SIGUSR1", signal(SignalKind::user_defined1())?),
                ("SIGUSR2", signal(SignalKind::user_defined2())?),
                ("SIGQUIT", signal(SignalKind::quit())?),
            ],
        })
    }

    /// Resolves on SIGTERM or SIGINT, passing each SIGHUP on to `reload`
    /// and logging each ignored signal meanwhile.
    async fn shutdown(mut self, reload: tokio::sync::mpsc::Sender<()>) {
        let [(usr1, s1), (usr2, s2), (quit, s3)] = &mut self.ignored;
        loop {
            let (name, stop) = tokio::select! {
                _ = self.term.recv() => ("SIGTERM", true),
                _ = self.int.recv() => ("SIGINT", true),
                _ = self.hup.recv() => {
                    // A reload already queued covers this one too.
                    let _ = reload.try_send(());
                    continue;
                }
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
