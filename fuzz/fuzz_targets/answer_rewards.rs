//! Fuzz target `answer_rewards`: see `medrl_fuzz::answer_rewards` for what it feeds and which properties it checks.
#![cfg_attr(feature = "libfuzzer", no_main)]

#[cfg(feature = "libfuzzer")]
libfuzzer_sys::fuzz_target!(|data: &[u8]| medrl_fuzz::answer_rewards(data));

/// Without libFuzzer: replay the files named on the command line (crash reproducers, seeds).
#[cfg(not(feature = "libfuzzer"))]
fn main() -> std::process::ExitCode {
    medrl_fuzz::replay_args(medrl_fuzz::answer_rewards)
}
