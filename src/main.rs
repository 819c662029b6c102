//! The `keygate` command: run the proxy, check a config file, and make or hash keys.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;
use clap::{Parser, Subcommand, ValueEnum};
use pingora::listeners::TcpSocketOptions;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::server::RunArgs;
use pingora::services::listening::Service;

use keygate::admin::Admin;
use keygate::ca_file::CaFileError;
use keygate::config::{self, LoadError, Upstream};
use keygate::frontend::{Frontend, FrontendLimits};
use keygate::lifecycle::{Lifecycle, ListenerCheck, ShutdownSequence};
use keygate::metrics::Metrics;
use keygate::proxy::{Keygate, UpstreamPeer};
use keygate::rate_limit::RateLimiter;
use keygate::reload::Reloader;
use keygate::table::{key, Environment, KeyHash, Table};
use keygate::upstream::{Resolver, UpstreamAddresses};

/// mimalloc returns freed memory to the operating system, so the memory that parsing a
/// large config file takes is given back after each load. glibc's allocator kept it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for an invalid or unreadable configuration file (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;
/// Exit code for bad input on standard input (EX_DATAERR).
const EXIT_BAD_INPUT: u8 = 65;
/// Exit code when a listener or the upstream is unavailable at start (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

/// Days ahead within which `check` lists expiring keys.
const EXPIRY_WARNING_DAYS: i64 = 30;

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "An API key and IP allowlist filter in front of an HTTP API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the proxy.
    Run {
        /// Path of the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and print a summary.
    Check {
        /// Path of the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Make or hash API keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print a new key on stdout, and on stderr the TOML lines that hold its SHA-256.
    New {
        /// The environment the key is for.
        #[arg(long, value_enum)]
        env: EnvArg,
    },
    /// Read a key on stdin and print its SHA-256 in lowercase hex.
    Hash,
}

#[derive(Clone, Copy, ValueEnum)]
enum EnvArg {
    Live,
    Test,
}

/// The reason a command failed.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("{0}")]
    Config(#[from] LoadError),
    #[error("failed to resolve upstream host {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("failed to listen on {address}: {source}; is another process using it?")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    CaFile(#[from] CaFileError),
    #[error("the environment variable {name} named by upstream.authorization_env is missing, empty or not a valid header value; set it before starting keygate")]
    AuthorizationEnv { name: String },
    #[error("failed to read the key from stdin: {0}")]
    ReadKey(std::io::Error),
    #[error("invalid key on stdin: {0}")]
    InvalidKey(&'static str),
    #[error("failed to get random bytes from the operating system: {0}")]
    Random(getrandom::Error),
}

impl AppError {
    fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) | AppError::CaFile(_) | AppError::AuthorizationEnv { .. } => {
                EXIT_BAD_CONFIG
            }
            AppError::ReadKey(_) | AppError::InvalidKey(_) => EXIT_BAD_INPUT,
            AppError::Resolve { .. } | AppError::Bind { .. } => EXIT_UNAVAILABLE,
            AppError::Random(_) => 1,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Key {
            command: KeyCommand::New { env },
        } => new_key(env),
        Command::Key {
            command: KeyCommand::Hash,
        } => hash_key(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if let AppError::Config(LoadError::Invalid(errors)) = &error {
                let count = errors.0.len();
                let noun = if count == 1 { "problem" } else { "problems" };
                eprintln!("error: the configuration is invalid ({count} {noun}):");
            }
            eprintln!("{error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn run(path: &Path) -> Result<(), AppError> {
    let loaded = config::load(path)?;
    keygate::logging::init(loaded.settings.log.format);
    let upstream = upstream_peer(&loaded.settings.upstream)?;
    let listen = &loaded.settings.listen;
    let bind =
        |address| TcpListener::bind(address).map_err(|source| AppError::Bind { address, source });
    for &address in listen.proxy.iter().chain(&listen.proxy_protocol) {
        // Pingora retries a busy address for 30 s and then stops only that service, so
        // a busy address is found here instead and the process exits.
        bind(address)?;
    }
    let admin_listener = listen.admin.map(bind).transpose()?;
    tracing::info!(
        config.path = %path.display(),
        campaigns = loaded.table.campaigns().len(),
        keys = loaded.table.key_count(),
        upstream.addresses = %upstream.addresses.all().iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "configuration loaded",
    );
    if upstream.tls && !upstream.verify {
        tracing::warn!(
            upstream.host = %loaded.settings.upstream.host,
            "upstream TLS certificates are NOT verified (insecure_skip_verify = true); anyone on the path can impersonate the upstream",
        );
    }

    let settings = loaded.settings;
    let table = Arc::new(ArcSwap::from_pointee(loaded.table));
    let metrics = Arc::new(Metrics::new(settings.metrics.per_campaign));
    let lifecycle = Lifecycle::new(settings.listen.proxy.clone());
    let reloader = Reloader::new(
        path.to_path_buf(),
        loaded.sha256,
        Arc::clone(&table),
        Arc::clone(&metrics),
        settings.clone(),
    );

    let server_conf = ServerConf {
        threads: 1,
        // With one thread there is nothing to steal, and the runtime without work
        // stealing costs less per request (docs/benchmarks.md).
        work_stealing: false,
        // Requests in flight get the grace period after the listeners close; the
        // shutdown sequence ends the process earlier once none is left.
        grace_period_seconds: Some(settings.shutdown.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ca_file: settings
            .upstream
            .ca_file
            .as_ref()
            .map(|path| path.display().to_string()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();

    let resolver =
        (settings.upstream.host.parse::<std::net::IpAddr>().is_err()).then(|| Resolver {
            host: settings.upstream.host.clone(),
            port: settings.upstream.port,
            interval: settings.upstream.dns_refresh,
            addresses: Arc::clone(&upstream.addresses),
        });
    let keygate = Keygate {
        table: Arc::clone(&table),
        upstream,
        limits: settings.limits,
        rate_limiter: RateLimiter::default(),
        metrics: Arc::clone(&metrics),
        lifecycle: Arc::clone(&lifecycle),
        access_log: settings.log.access,
        proxy_protocol_listeners: settings.listen.proxy_protocol.clone(),
    };
    let proxy = Arc::new(pingora::proxy::http_proxy(&server.configuration, keygate));
    let limits = FrontendLimits {
        header_timeout: settings.limits.header_timeout,
        keepalive_timeout: settings.limits.keepalive_timeout,
        max_header_bytes: settings.limits.max_header_bytes,
    };
    let listener_groups = [
        ("proxy", &settings.listen.proxy, false),
        (
            "proxy with PROXY protocol",
            &settings.listen.proxy_protocol,
            true,
        ),
    ];
    for (name, addresses, proxy_protocol) in listener_groups {
        if addresses.is_empty() {
            continue;
        }
        let frontend = Frontend {
            proxy: Arc::clone(&proxy),
            table: Arc::clone(&table),
            metrics: Arc::clone(&metrics),
            limits,
            proxy_protocol,
            access_log: settings.log.access,
            lifecycle: Arc::clone(&lifecycle),
        };
        let mut service = Service::new(name.to_owned(), frontend);
        for address in addresses {
            let mut options = TcpSocketOptions::default();
            if address.is_ipv6() && address.ip().is_unspecified() {
                // "[::]:port" serves IPv4 clients too, whatever the system default is.
                options.ipv6_only = Some(false);
            }
            service.add_tcp_with_settings(&address.to_string(), options);
            tracing::info!(listen.address = %address, proxy_protocol, "proxy listener configured");
        }
        server.add_service(service);
    }

    if let (Some(listener), Some(address)) = (admin_listener, settings.listen.admin) {
        let admin = Admin::new(listener, metrics, Arc::clone(&lifecycle));
        server.add_service(background_service("admin", admin));
        tracing::info!(listen.address = %address, "admin listener bound");
    }
    server.add_service(background_service(
        "listener check",
        ListenerCheck {
            lifecycle: Arc::clone(&lifecycle),
        },
    ));
    server.add_service(background_service("config reload", reloader));
    if let Some(resolver) = resolver {
        server.add_service(background_service("upstream resolver", resolver));
    }

    let shutdown = ShutdownSequence {
        lifecycle,
        drain_delay: settings.shutdown.drain_delay,
        grace_period: settings.shutdown.grace_period,
    };
    server.run(RunArgs {
        shutdown_signal: Box::new(shutdown),
    });
    tracing::info!("keygate stopped");
    Ok(())
}

/// Resolves the upstream host and reads its credentials once, at start.
fn upstream_peer(upstream: &Upstream) -> Result<UpstreamPeer, AppError> {
    let addresses = keygate::upstream::resolve(&upstream.host, upstream.port)
        .map_err(|error| error.to_string())
        .and_then(|found| {
            (!found.is_empty())
                .then_some(found)
                .ok_or_else(|| "no addresses found".to_owned())
        })
        .map_err(|reason| AppError::Resolve {
            host: upstream.host.clone(),
            reason,
        })?;
    if let Some(path) = &upstream.ca_file {
        keygate::ca_file::check(path)?;
    }
    let authorization = match &upstream.authorization_env {
        None => None,
        Some(name) => {
            let value = std::env::var(name).ok().filter(|value| !value.is_empty());
            let mut header = value
                .and_then(|value| http::HeaderValue::from_str(&value).ok())
                .ok_or_else(|| AppError::AuthorizationEnv { name: name.clone() })?;
            header.set_sensitive(true);
            Some(header)
        }
    };
    Ok(UpstreamPeer {
        addresses: UpstreamAddresses::new(addresses),
        tls: upstream.tls,
        sni: upstream.sni.clone(),
        verify: !upstream.insecure_skip_verify,
        connect_timeout: upstream.connect_timeout,
        read_timeout: upstream.read_timeout,
        authorization,
    })
}

fn check(path: &Path) -> Result<(), AppError> {
    let loaded = config::load(path)?;
    print!("{}", summary(path, &loaded.table, keygate::unix_now()));
    Ok(())
}

/// Describes a valid table: counts, and the keys that expire soon or have expired.
fn summary(path: &Path, table: &Table, now: i64) -> String {
    let campaigns = table.campaigns();
    let ranges: usize = campaigns.iter().map(|c| c.networks.range_count()).sum();
    let mut text = format!(
        "{}: valid\nenvironment: {}\ncampaigns: {}\nkeys: {}\nnetworks: {} (after merging overlaps)\n",
        path.display(),
        table.environment().as_str(),
        campaigns.len(),
        table.key_count(),
        ranges,
    );
    let horizon = now + EXPIRY_WARNING_DAYS * 86_400;
    let mut expiring: Vec<(i64, &str, &str)> = campaigns
        .iter()
        .flat_map(|c| c.keys.iter().map(move |k| (k, &*c.id)))
        .filter_map(|(k, campaign)| k.expires_at.map(|at| (at, campaign, &*k.id)))
        .filter(|&(at, _, _)| at <= horizon)
        .collect();
    expiring.sort_unstable();
    text.push_str(&format!(
        "keys expiring within {EXPIRY_WARNING_DAYS} days: {}\n",
        expiring.len()
    ));
    for (at, campaign, key) in expiring {
        let when = chrono::DateTime::from_timestamp(at, 0)
            .map_or_else(|| at.to_string(), |t| t.to_rfc3339());
        let state = if at <= now { "expired" } else { "expires" };
        text.push_str(&format!(
            "  campaign \"{campaign}\" key \"{key}\": {state} {when}\n"
        ));
    }
    text
}

fn new_key(env: EnvArg) -> Result<(), AppError> {
    let environment = match env {
        EnvArg::Live => Environment::Live,
        EnvArg::Test => Environment::Test,
    };
    let key = key::generate(environment).map_err(AppError::Random)?;
    let hash = KeyHash::of(key.as_bytes()).to_hex();
    println!("{key}");
    eprintln!(
        "\n# The key above is shown once and stored nowhere; give it to the caller now.\n\
         # Paste these lines under the campaign's [[campaigns]] table:\n\
         [[campaigns.keys]]\n\
         id = \"key-{}\"\n\
         sha256 = \"{hash}\"",
        &hash[..8]
    );
    Ok(())
}

fn hash_key() -> Result<(), AppError> {
    let mut input = Vec::new();
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("Paste the key, then press Enter and Ctrl-D:");
    }
    stdin
        .lock()
        .read_to_end(&mut input)
        .map_err(AppError::ReadKey)?;
    let key = input
        .strip_suffix(b"\n")
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .unwrap_or(&input);
    if key.is_empty() {
        return Err(AppError::InvalidKey("the input is empty"));
    }
    if key
        .iter()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(AppError::InvalidKey(
            "the input contains whitespace or more than one line; pass the key alone",
        ));
    }
    if let Some(problem) = keygate::table::key_format_problem(key) {
        return Err(AppError::InvalidKey(problem));
    }
    println!("{}", KeyHash::of(key).to_hex());
    Ok(())
}
