//! The `kairos` binary: the CLI edge, where errors become one line and an exit code.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KAIROS_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = cli::run(args) {
        // One clear line: what went wrong and, through the chain, where.
        // Error types often repeat their source's text; print each part once.
        let mut line = String::new();
        for part in e.chain().map(|c| c.to_string()) {
            if !line.contains(&part) {
                if !line.is_empty() {
                    line.push_str(": ");
                }
                line.push_str(&part);
            }
        }
        eprintln!("error: {}", line.replace('\n', " "));
        std::process::exit(1);
    }
}
