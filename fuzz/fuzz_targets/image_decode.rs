//! Fuzz target `image_decode`: see `medrl_fuzz::image_decode` for what it feeds and which properties it checks.
#![cfg_attr(feature = "libfuzzer", no_main)]

#[cfg(feature = "libfuzzer")]
libfuzzer_sys::fuzz_target!(|data: &[u8]| medrl_fuzz::image_decode(data));

/// Without libFuzzer: replay the files named on the command line (crash reproducers, seeds).
#[cfg(not(feature = "libfuzzer"))]
fn main() -> std::process::ExitCode {
    medrl_fuzz::replay_args(medrl_fuzz::image_decode)
}
