fn main() -> std::process::ExitCode {
    pushrelay::cli::main()
}
