// mimalloc: per-thread free lists suit the worker-per-core model (no arena contention), and
// relaying allocates and frees many small buffers per push.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pushrelay::cli::main()
}
