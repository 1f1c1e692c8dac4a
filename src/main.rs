//! The `aegis` binary: everything lives in the library; see `aegis --help`.

/// mimalloc instead of glibc's malloc: the Check path makes many small allocations and
/// tonic then takes an 8 KiB buffer, which made glibc consolidate its fast bins on every
/// request (see the benchmark section of the README for the figures).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    aegis::cli::main()
}
