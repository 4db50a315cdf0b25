//! Writes luksify's man page and shell completions, generated from its clap definitions
//! (`luksify::cli::Cli`), into a directory: `luksify.8`, `luksify.bash`, `_luksify` (zsh),
//! `luksify.fish`. `packaging/build-deb` runs it when it builds the Debian package, so the
//! page and the completions always say what the binary accepts.
//!
//!     luksify-gen-docs OUT_DIR

use clap::CommandFactory;
use clap_complete::Shell;
use std::path::PathBuf;

fn main() {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: luksify-gen-docs OUT_DIR");
        std::process::exit(2);
    };
    if let Err(e) = generate(&out) {
        eprintln!("luksify-gen-docs: {}: {e}", out.display());
        std::process::exit(1);
    }
}

fn generate(out: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    let cmd = luksify::cli::Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).section("8").render(&mut page)?;
    page.extend_from_slice(luksify::error::exit::man_section().as_bytes());
    std::fs::write(out.join("luksify.8"), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut c = cmd.clone();
        clap_complete::generate_to(shell, &mut c, "luksify", out)?;
    }
    Ok(())
}
