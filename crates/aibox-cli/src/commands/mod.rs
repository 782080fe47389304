//! One module per command family.

mod audit;
mod auth;
mod config;
mod doctor;
pub(crate) mod hook;
mod image;
mod lifecycle;
pub(crate) mod network;
pub(crate) mod policy;
mod push;
mod recording;
mod siem;
mod vault;

use anyhow::Result;

use crate::args::{Cli, Command};

/// Loads the config the way every command does.
pub(crate) fn load_config(
    cli_config: Option<std::path::PathBuf>,
) -> Result<(aibox_config::Loaded, aibox_config::Sources)> {
    let sources = aibox_config::Sources::standard(cli_config);
    let loaded = aibox_config::load(&sources)?;
    Ok((loaded, sources))
}

/// Runs the parsed command; returns the process exit code.
pub fn dispatch(cli: Cli) -> Result<i32> {
    let r = run(cli);
    // A Vault token logged in for a sandbox that never got it.
    if r.is_err() {
        vault::revoke_pending();
    }
    r
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Supervise { .. } => Ok(aibox_supervisor::supervisor::run()),
        Command::Config(c) => config::run(cli.config, c),
        Command::Doctor(a) => doctor::run(cli.config, a),
        Command::Audit(a) => audit::run(cli.config, a),
        Command::Metrics(a) => siem::metrics(cli.config, a),
        Command::Recording(a) => recording::run(cli.config, a),
        Command::Siem(a) => siem::siem(cli.config, a),
        Command::Network(a) => network::run(cli.config, a),
        Command::Policy(a) => policy::run(cli.config, a),
        Command::Image(a) => image::run(cli.config, a),
        Command::Auth(a) => auth::run(cli.config, a),
        Command::Push(a) => push::run(cli.config, a),
        Command::Update { engine } => image::update(cli.config, engine),
        Command::Repair(crate::args::RepairCmd::Cache { engine }) => {
            image::repair_cache(cli.config, engine)
        }
        Command::Start(a) => lifecycle::start(cli.config, a),
        Command::Run(a) => lifecycle::run(cli.config, a),
        Command::Exec(a) => lifecycle::exec(cli.config, a),
        Command::Shell(a) => lifecycle::shell(cli.config, a),
        Command::Status(a) => lifecycle::status(cli.config, a),
        Command::List(a) => lifecycle::list(cli.config, a),
        Command::Stop(a) => lifecycle::stop(cli.config, a),
    }
}
