//! `aibox`: the command-line edge. Parses arguments and calls the library
//! crates; every behaviour lives there.

mod args;
mod commands;
mod workspace;

use clap::Parser;

fn main() {
    // Inside a container the same binary is init, session shim and
    // self-test; those entry points bypass the CLI parser.
    // git runs the same binary as its remote helper for `aibox::` URLs.
    if std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == aibox_push::helper::PROGRAM))
        .unwrap_or(false)
    {
        let rest: Vec<String> = std::env::args().skip(1).collect();
        std::process::exit(aibox_push::helper::run(&rest));
    }
    let internal = std::env::args_os()
        .nth(1)
        .is_some_and(|a| a.to_string_lossy().starts_with("__container-"));
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == commands::network::INSIDE_ARG)
    {
        std::process::exit(commands::network::inside());
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == commands::hook::INSIDE_ARG)
    {
        let rest: Vec<String> = std::env::args().skip(2).collect();
        std::process::exit(commands::hook::inside(&rest));
    }
    if internal {
        let argv: Vec<String> = std::env::args_os()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if let Some(code) = aibox_sandbox::container::dispatch(&argv) {
            std::process::exit(code);
        }
    }
    let cli = args::Cli::parse();
    let code = match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aibox: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
