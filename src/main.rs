//! The `gatelet` binary.

fn main() {
    let code = gatelet::cli::main(std::env::args().skip(1).collect());
    std::process::exit(code);
}
