//! `overlay-agent`: a drop-in for `flanneld` with the VXLAN backend and the
//! etcd subnet manager. This file parses the flags, sets up logging and the
//! runtime, and dispatches: the daemon is [`overlay_agent::daemon`], the
//! subcommands are [`overlay_agent::commands`] and
//! [`overlay_agent::docker_opts`].

use std::process::ExitCode;

use overlay_agent::{
    cli::{Cli, Command},
    commands, daemon,
    flannel::docker_opts,
};

fn main() -> ExitCode {
    let cli = match Cli::parse_from_go(std::env::args()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // RUST_LOG wins over klog's -v, which wins over the default; an empty
    // RUST_LOG (an env file's `RUST_LOG=`) counts as unset.
    let level = cli.compat.log_filter().unwrap_or("info");
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    if std::env::var_os("RUST_LOG").is_some_and(|v| v.is_empty()) {
        logger.parse_filters(level);
    }
    logger.init();
    for warning in cli
        .compat
        .warnings()
        .into_iter()
        .chain(cli.kube_flag_warnings())
    {
        log::warn!("{warning}");
    }
    if let Err(e) = cli.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::Status) => rt.block_on(commands::status(&cli)),
        Some(Command::Cleanup(ref args)) => rt.block_on(commands::cleanup(&cli, args)),
        Some(Command::MkDockerOpts(ref args)) => {
            docker_opts::run(args, &cli.subnet_file).map_err(Into::into)
        }
        None => rt.block_on(daemon::run(&cli)).map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
