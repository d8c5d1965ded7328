//! A test hook for the fault-injection tests of real processes (`crates/medrl/tests`):
//! `MEDRL_TEST_PAUSE=<point>:<step>` makes the learner log that it pauses and then stall for ten
//! minutes at `point` of step `step`, so a test can SIGKILL it at exactly that moment. Points:
//! `step` (the step is computed but not yet recorded in the consumed log) and `checkpoint` (the
//! checkpoint's temporary folder is complete but not yet renamed into place). Not for operators;
//! unset, it costs one environment lookup per step and per checkpoint.

use std::time::Duration;

/// The variable naming the pause point.
pub const PAUSE_ENV: &str = "MEDRL_TEST_PAUSE";

/// Long enough for any test to kill the process, short enough not to hang a forgotten one forever.
const PAUSE: Duration = Duration::from_secs(600);

/// True when `value` (the variable's text) asks for a pause at `point` of `step`.
fn asks(value: &str, point: &str, step: u64) -> bool {
    value.split_once(':').is_some_and(|(p, s)| p.trim() == point && s.trim().parse::<u64>() == Ok(step))
}

/// Stalls the calling thread when `MEDRL_TEST_PAUSE` names this point and step.
pub(crate) fn pause_if_asked(point: &str, step: u64) {
    let Some(value) = std::env::var_os(PAUSE_ENV) else { return };
    if asks(&value.to_string_lossy(), point, step) {
        tracing::warn!(point, step, "test hook {PAUSE_ENV}: pausing");
        std::thread::sleep(PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_point_and_step_pause() {
        assert!(asks("checkpoint:3", "checkpoint", 3));
        assert!(asks(" step : 2 ", "step", 2));
        assert!(!asks("checkpoint:3", "checkpoint", 2));
        assert!(!asks("checkpoint:3", "step", 3));
        assert!(!asks("checkpoint", "checkpoint", 3));
        assert!(!asks("checkpoint:x", "checkpoint", 3));
    }
}
