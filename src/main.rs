//! The `aegis` binary: everything lives in the library; see `aegis --help`.

fn main() -> std::process::ExitCode {
    aegis::cli::main()
}
