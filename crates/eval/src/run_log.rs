//! Readers of a run directory's logs, for `medrl plot`: the learner's per-step lines
//! (`StepSummary` of `medrl_learner::service`), the `"event": "eval"` lines `medrl train` appends
//! to its `metrics.jsonl`, and the coordinator's `support.jsonl` snapshots.
//!
//! Only the fields a plot needs are read, so newer writers with more fields still load. A line
//! that is not what it should be is an error naming the file, the line and the field; a last line
//! without its newline that does not parse is dropped (the writer was killed mid-line).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{EvalError, Result};

/// One optimizer step of the learner.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPoint {
    /// Optimizer step (the policy version it produced).
    pub step: u64,
    /// Mean total reward of the step's completions.
    pub mean_reward: f64,
    /// Mean accuracy reward.
    pub mean_accuracy: f64,
    /// Completion tokens in the loss.
    pub tokens: f64,
    /// Seconds from taking the groups to the optimizer step's end.
    pub step_seconds: f64,
    /// Wall clock at the step's end, seconds since the Unix epoch.
    pub time: f64,
    /// Mean and max policy staleness of the trained groups; absent in logs older than the fields.
    pub staleness: Option<(f64, f64)>,
}

/// Headline numbers of one evaluation phase (`before`, `sft`, `after`).
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseEval {
    /// The phase name.
    pub phase: String,
    /// Greedy Acc@1, a fraction.
    pub acc_at_1: f64,
    /// Pass@K at the largest k evaluated, a fraction.
    pub pass_at_k: f64,
    /// That K.
    pub k: u64,
}

/// One modality of a support snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct ModalityRow {
    /// Modality (or dataset for records without one).
    pub modality: String,
    /// Prompts per support class, in the snapshot's `classes` order.
    pub counts: Vec<u64>,
    /// Mean last pass rate over the observed prompts; `None` when none was observed.
    pub mean_pass_rate: Option<f64>,
}

/// The coordinator's per-modality support map at the end of an epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct SupportSnapshot {
    /// The epoch that had completed.
    pub epoch: u64,
    /// Support class names (`unseen`, `zero`, `partial`, `saturated`).
    pub classes: Vec<String>,
    /// One row per modality.
    pub modalities: Vec<ModalityRow>,
}

/// The JSON objects of a JSONL file with their 1-based line numbers; blank lines are skipped.
fn objects(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => out.push((i + 1, map)),
            Ok(_) => return Err(line_error(path, i + 1, "expected a JSON object")),
            Err(_) if i + 1 == lines.len() && !complete => {}
            Err(e) => return Err(line_error(path, i + 1, format!("not JSON: {e}"))),
        }
    }
    Ok(out)
}

fn line_error(path: &Path, line: usize, problem: impl Into<String>) -> EvalError {
    EvalError::Line { path: path.to_path_buf(), line, problem: problem.into() }
}

/// Field `name` of a line as a number.
fn number(obj: &Map<String, Value>, name: &str, path: &Path, line: usize) -> Result<f64> {
    match obj.get(name) {
        Some(v) => v.as_f64().ok_or_else(|| line_error(path, line, format!("field `{name}`: expected a number, got {v}"))),
        None => Err(line_error(path, line, format!("missing field `{name}` (a number)"))),
    }
}

/// Field `name` of a line as a non-negative integer.
fn count(obj: &Map<String, Value>, name: &str, path: &Path, line: usize) -> Result<u64> {
    match obj.get(name) {
        Some(v) => v.as_u64().ok_or_else(|| line_error(path, line, format!("field `{name}`: expected a non-negative integer, got {v}"))),
        None => Err(line_error(path, line, format!("missing field `{name}` (a non-negative integer)"))),
    }
}

/// Field `name` of a line as a string.
fn string(obj: &Map<String, Value>, name: &str, path: &Path, line: usize) -> Result<String> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(line_error(path, line, format!("field `{name}`: expected a string, got {v}"))),
        None => Err(line_error(path, line, format!("missing field `{name}` (a string)"))),
    }
}

/// The learner's steps in `path`, one per step (the last line of a step wins: after a learner
/// restart the steps past its checkpoint are logged again), in step order. Lines with an
/// `event` field are the run's own events, not steps, and are passed over.
pub fn read_steps(path: &Path) -> Result<Vec<StepPoint>> {
    let mut steps = BTreeMap::new();
    for (line, obj) in objects(path)? {
        if obj.contains_key("event") {
            continue;
        }
        let staleness = match (obj.get("mean_staleness"), obj.get("max_staleness")) {
            (None, None) => None,
            _ => Some((number(&obj, "mean_staleness", path, line)?, number(&obj, "max_staleness", path, line)?)),
        };
        let point = StepPoint {
            step: count(&obj, "step", path, line)?,
            mean_reward: number(&obj, "mean_reward", path, line)?,
            mean_accuracy: number(&obj, "mean_accuracy", path, line)?,
            tokens: number(&obj, "tokens", path, line)?,
            step_seconds: number(&obj, "step_seconds", path, line)?,
            time: number(&obj, "time", path, line)?,
            staleness,
        };
        steps.insert(point.step, point);
    }
    Ok(steps.into_values().collect())
}

/// The `"event": "eval"` lines of a run's `metrics.jsonl`, the last one per phase, in the order
/// the phases first appear.
pub fn read_eval_events(path: &Path) -> Result<Vec<PhaseEval>> {
    let mut phases: Vec<PhaseEval> = Vec::new();
    for (line, obj) in objects(path)? {
        if obj.get("event").and_then(Value::as_str) != Some("eval") {
            continue;
        }
        let eval = PhaseEval {
            phase: string(&obj, "phase", path, line)?,
            acc_at_1: number(&obj, "acc_at_1", path, line)?,
            pass_at_k: number(&obj, "pass_at_k", path, line)?,
            k: count(&obj, "k", path, line)?,
        };
        match phases.iter_mut().find(|p| p.phase == eval.phase) {
            Some(p) => *p = eval,
            None => phases.push(eval),
        }
    }
    Ok(phases)
}

/// The last snapshot of a `support.jsonl`; `None` for a file without one.
pub fn read_latest_support(path: &Path) -> Result<Option<SupportSnapshot>> {
    let mut latest = None;
    for (line, obj) in objects(path)? {
        let classes = string_list(&obj, "classes", path, line)?;
        let Some(Value::Array(rows)) = obj.get("modalities") else {
            return Err(line_error(path, line, "field `modalities`: expected a list of objects"));
        };
        let mut modalities = Vec::with_capacity(rows.len());
        for row in rows {
            let Value::Object(row) = row else { return Err(line_error(path, line, "field `modalities`: expected a list of objects")) };
            let counts = match row.get("counts") {
                Some(Value::Array(c)) if c.len() == classes.len() => c.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>(),
                _ => None,
            };
            let counts = counts.ok_or_else(|| {
                line_error(path, line, format!("field `modalities[].counts`: expected {} non-negative integers (one per class)", classes.len()))
            })?;
            let mean_pass_rate = match row.get("mean_pass_rate") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_f64().ok_or_else(|| line_error(path, line, format!("field `modalities[].mean_pass_rate`: expected a number or null, got {v}")))?),
            };
            modalities.push(ModalityRow { modality: string(row, "modality", path, line)?, counts, mean_pass_rate });
        }
        latest = Some(SupportSnapshot { epoch: count(&obj, "epoch", path, line)?, classes, modalities });
    }
    Ok(latest)
}

fn string_list(obj: &Map<String, Value>, name: &str, path: &Path, line: usize) -> Result<Vec<String>> {
    let list = match obj.get(name) {
        Some(Value::Array(items)) => items.iter().map(|v| v.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>(),
        _ => None,
    };
    list.ok_or_else(|| line_error(path, line, format!("field `{name}`: expected a list of strings")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn steps_keep_the_last_line_per_step_and_skip_events() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
        let line = |step: u64, reward: f64| {
            format!(r#"{{"step":{step},"mean_reward":{reward},"mean_accuracy":0.5,"tokens":10,"step_seconds":1.0,"time":{}}}"#, 100 + step)
        };
        let text = format!("{}\n{}\n{{\"event\":\"eval\",\"phase\":\"before\"}}\n{}\n{}", line(1, 0.1), line(2, 0.2), line(2, 0.3), &line(3, 0.4)[..20]);
        let steps = read_steps(&write(dir.path(), "m.jsonl", &text))?;
        assert_eq!(steps.iter().map(|s| (s.step, s.mean_reward)).collect::<Vec<_>>(), vec![(1, 0.1), (2, 0.3)], "redo wins; torn tail dropped");
        assert!(steps[0].staleness.is_none());
        let bad = write(dir.path(), "bad.jsonl", &format!("{}\n{{\"step\":2,\"mean_reward\":\"high\"}}\n", line(1, 0.1)));
        let e = read_steps(&bad).expect_err("bad field").to_string();
        assert!(e.contains("bad.jsonl:2") && e.contains("mean_reward"), "{e}");
        Ok(())
    }

    #[test]
    fn eval_events_and_support_snapshots() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
        let ev = |phase: &str, acc: f64| format!(r#"{{"event":"eval","phase":"{phase}","acc_at_1":{acc},"pass_at_k":0.9,"k":8,"time":1}}"#);
        let text = [ev("before", 0.1), r#"{"event":"sft_step","step":1,"loss":2.0}"#.into(), ev("sft", 0.2), ev("before", 0.15)].join("\n") + "\n";
        let phases = read_eval_events(&write(dir.path(), "metrics.jsonl", &text))?;
        assert_eq!(phases.iter().map(|p| (p.phase.as_str(), p.acc_at_1)).collect::<Vec<_>>(), vec![("before", 0.15), ("sft", 0.2)]);
        let snap = |epoch: u32| format!(r#"{{"epoch":{epoch},"classes":["zero","partial"],"modalities":[{{"modality":"ct","counts":[1,{epoch}],"mean_pass_rate":null}}]}}"#);
        let latest = read_latest_support(&write(dir.path(), "support.jsonl", &format!("{}\n{}\n", snap(0), snap(1))))?.expect("a snapshot");
        assert_eq!((latest.epoch, latest.modalities[0].counts.clone(), latest.modalities[0].mean_pass_rate), (1, vec![1, 1], None));
        let bad = write(dir.path(), "bad.jsonl", r#"{"epoch":0,"classes":["zero"],"modalities":[{"modality":"ct","counts":[1,2]}]}"#);
        let e = read_latest_support(&bad).expect_err("count mismatch").to_string();
        assert!(e.contains("bad.jsonl:1") && e.contains("counts"), "{e}");
        Ok(())
    }
}
