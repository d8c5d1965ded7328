//! `medrl plot RUN_DIR`: finds a run directory's logs in either layout and draws what they allow.
//!
//! - `medrl train`: learner steps and coordinator snapshots under `rl/` (`rl/metrics.jsonl`,
//!   `rl/support.jsonl`), evaluations in `metrics.jsonl` (`"event": "eval"`) and `eval/<phase>/`.
//! - `medrl coordinator / learner --config`: the learner's steps in `learner/metrics.jsonl`, the
//!   coordinator's snapshots beside its journal (`support.jsonl` with the default journal).
//! - The learner's own directory given as RUN_DIR: its steps in `metrics.jsonl`.
//!
//! A figure whose input is missing is skipped with the reason; a directory with none of the
//! files is an error.

use std::path::{Path, PathBuf};

use crate::error::{EvalError, Result};
use crate::metrics::Metrics;
use crate::run_charts::{plot_acc_passk, plot_reward, plot_staleness, plot_support, plot_throughput};
use crate::run_log::{PhaseEval, read_eval_events, read_latest_support, read_steps};

/// Step logs, in the order they are tried.
pub const STEP_LOGS: [&str; 3] = ["rl/metrics.jsonl", "learner/metrics.jsonl", "metrics.jsonl"];
/// Support snapshots, in the order they are tried.
pub const SUPPORT_LOGS: [&str; 2] = ["rl/support.jsonl", "support.jsonl"];
/// The run's event log (`medrl train`).
pub const EVENTS: &str = "metrics.jsonl";
/// Phases in display order; others follow by name.
const PHASE_ORDER: [&str; 3] = ["before", "sft", "after"];

/// What `plot_run` drew and what it passed over.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlotReport {
    /// Figures written.
    pub written: Vec<PathBuf>,
    /// Figures skipped: file name and why.
    pub skipped: Vec<(String, String)>,
}

impl PlotReport {
    fn record(&mut self, name: &str, out: &Path, input: std::result::Result<(), String>) {
        match input {
            Ok(()) => self.written.push(out.join(name)),
            Err(why) => self.skipped.push((name.to_owned(), why)),
        }
    }
}

fn existing(run_dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    names.iter().map(|n| run_dir.join(n)).filter(|p| p.is_file()).collect()
}

/// `eval/<phase>/metrics.json` of every phase, in display order.
fn phase_metrics(run_dir: &Path) -> Result<Vec<(String, Metrics)>> {
    let dir = run_dir.join("eval");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
    let mut phases = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| EvalError::io(&dir, e))?;
        let path = entry.path().join("metrics.json");
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| EvalError::io(&path, e))?;
        let metrics: Metrics = serde_json::from_str(&text).map_err(|e| EvalError::Line { path: path.clone(), line: e.line(), problem: e.to_string() })?;
        phases.push((entry.file_name().to_string_lossy().into_owned(), metrics));
    }
    phases.sort_by_key(|(name, _)| (PHASE_ORDER.iter().position(|p| p == name).unwrap_or(PHASE_ORDER.len()), name.clone()));
    Ok(phases)
}

/// The first step log with steps in it, with its steps.
fn steps_of(run_dir: &Path) -> Result<Option<(PathBuf, Vec<crate::run_log::StepPoint>)>> {
    for path in existing(run_dir, &STEP_LOGS) {
        let steps = read_steps(&path)?;
        if !steps.is_empty() {
            return Ok(Some((path, steps)));
        }
    }
    Ok(None)
}

/// Draws every figure the logs of `run_dir` allow into `out` (created if needed).
pub fn plot_run(run_dir: &Path, out: &Path) -> Result<PlotReport> {
    if !run_dir.is_dir() {
        return Err(EvalError::Data(format!("{}: not a run directory (no such folder)", run_dir.display())));
    }
    let step_logs = existing(run_dir, &STEP_LOGS);
    let support_logs = existing(run_dir, &SUPPORT_LOGS);
    let phases = phase_metrics(run_dir)?;
    if step_logs.is_empty() && support_logs.is_empty() && phases.is_empty() {
        return Err(EvalError::Data(format!(
            "{}: no run files found (looked for {}, {}, eval/<phase>/metrics.json)",
            run_dir.display(),
            STEP_LOGS.join(", "),
            SUPPORT_LOGS.join(", "),
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| EvalError::io(out, e))?;
    let mut report = PlotReport::default();
    let figure = |name: &str| out.join(name);

    let steps = steps_of(run_dir)?;
    let no_steps = if step_logs.is_empty() {
        format!("no learner step log (looked for {})", STEP_LOGS.join(", "))
    } else {
        format!("no learner steps in {}", step_logs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
    };
    match &steps {
        Some((path, steps)) => {
            plot_reward(steps, &figure("reward.png"))?;
            report.record("reward.png", out, Ok(()));
            plot_throughput(steps, &figure("throughput.png"))?;
            report.record("throughput.png", out, Ok(()));
            if steps.iter().any(|s| s.staleness.is_some()) {
                plot_staleness(steps, &figure("staleness.png"))?;
                report.record("staleness.png", out, Ok(()));
            } else {
                report.record("staleness.png", out, Err(format!("{} has no mean_staleness / max_staleness (written by an older learner)", path.display())));
            }
        }
        None => {
            for name in ["reward.png", "throughput.png", "staleness.png"] {
                report.record(name, out, Err(no_steps.clone()));
            }
        }
    }

    let events = run_dir.join(EVENTS);
    let mut evals: Vec<PhaseEval> = if events.is_file() { read_eval_events(&events)? } else { Vec::new() };
    // Phases evaluated without an event line (older runs, `medrl eval --out RUN/eval/x`).
    for (phase, m) in &phases {
        if !evals.iter().any(|e| &e.phase == phase)
            && let Some((k, pass)) = m.overall.support()
        {
            evals.push(PhaseEval { phase: phase.clone(), acc_at_1: m.overall.acc_at_1, pass_at_k: pass, k });
        }
    }
    if evals.is_empty() && phases.is_empty() {
        report.record("acc_passk.png", out, Err(format!("no \"event\": \"eval\" line in {EVENTS} and no eval/<phase>/metrics.json")));
    } else {
        plot_acc_passk(&evals, &phases, &figure("acc_passk.png"))?;
        report.record("acc_passk.png", out, Ok(()));
    }

    let mut snapshot = None;
    for path in &support_logs {
        if let Some(s) = read_latest_support(path)? {
            snapshot = Some(s);
            break;
        }
    }
    match snapshot {
        Some(s) if !s.modalities.is_empty() => {
            plot_support(&s, &figure("support.png"))?;
            report.record("support.png", out, Ok(()));
        }
        _ => report.record(
            "support.png",
            out,
            Err(format!("no support snapshot (looked for {}; the coordinator writes one beside its journal when an epoch completes)", SUPPORT_LOGS.join(", "))),
        ),
    }
    Ok(report)
}
