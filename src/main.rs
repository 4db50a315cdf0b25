fn main() {
    std::process::exit(luksify::cli::main());
}
