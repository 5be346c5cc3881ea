//! The `xmoe-top` command line; everything lives in [`xmoe_top::cli`].

fn main() -> std::process::ExitCode {
    xmoe_top::cli::main()
}
