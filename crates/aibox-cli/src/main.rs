//! `aibox`: the command-line edge. Parses arguments and calls the library
//! crates; every behaviour lives there.

mod args;
mod commands;
mod workspace;

use clap::Parser;

fn main() {
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
