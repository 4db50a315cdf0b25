fn main() {
    // Die quietly on a closed pipe (`luksify status | head`), like any Unix tool, instead of
    // panicking in println!.
    // SAFETY: setting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(luksify::cli::main());
}
