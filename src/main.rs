fn main() {
    // Die quietly on a closed pipe (`luksify status | head`), like any Unix tool, instead of
    // panicking in println!.
    // SAFETY: setting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // parse, run, say how it ended
    let cli = luksify::cli::parse_with_version(&luksify::app::libcryptsetup_version());
    let json = cli.wants_json();
    let code = match luksify::app::run(cli) {
        Ok(code) => code,
        Err(e) => {
            luksify::error::report(&e, json);
            e.exit_code()
        }
    };
    std::process::exit(code);
}
