//! A rollout worker cut off by a network partition and let back. The coordinator, the learner and
//! worker A run in one network namespace; worker B runs in a second one, joined to the first by a
//! veth pair. Both namespaces belong to the test (`unshare`, with a user namespace so no host
//! privilege is needed), so nothing of the host's network is touched. While B holds a lease the
//! link goes down: B's packets vanish without an error, as in a real partition. The link stays
//! down until the coordinator has declared B dead and the learner has trained B's prompt from
//! A's retry. Then it comes back: B's group (sent into the void, retransmitted by TCP) reaches the
//! learner as a duplicate and its ack reaches the coordinator late, neither counting again; B
//! registers anew and leases more. The run completes with every prompt of the epoch trained
//! exactly once, each step with the prompts of the data order.
//!
//! Needs `unshare`, `nsenter` and `ip` (util-linux, iproute2) and a kernel allowing user and
//! network namespaces; without them the test fails saying so.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, Spec, wait_exit};

const COORDINATOR_PORT: u16 = 50051;
const LEARNER_PORT: u16 = 50052;
/// Addresses of the veth ends: the servers' namespace and worker B's.
const SERVERS_IP: &str = "10.199.0.1";
const WORKER_B_IP: &str = "10.199.0.2";
/// The veth end in the servers' namespace (taking it down cuts B off) and its peer.
const LINK: &str = "medrl-p0";
const PEER: &str = "medrl-p1";

/// Processes killed (and reaped) when the test ends, however it ends.
struct KillOnDrop(Vec<(Child, String)>);

impl KillOnDrop {
    fn push(&mut self, child: Child, name: &str) {
        self.0.push((child, name.to_string()));
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Role processes first (pushed last), then the namespace holders.
        for (child, _) in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[track_caller]
fn no_namespaces(what: &str, detail: &str) -> ! {
    panic!(
        "this test needs network namespaces of its own (user + network namespaces via `unshare -rn`, \
         `nsenter`, `ip` from iproute2) and could not set them up: {what}: {detail}"
    )
}

fn ip_binary() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("ip")
}

/// The arguments that run a program inside the namespaces of process `pid`.
fn enter(pid: u32) -> Vec<String> {
    ["nsenter", "-t", &pid.to_string(), "-U", "-n", "--preserve-credentials", "--"].iter().map(|s| s.to_string()).collect()
}

/// Starts a process that holds a namespace open, and waits until it is in place.
fn hold(mut command: Command, what: &str) -> Child {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| no_namespaces(what, &e.to_string()));
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            no_namespaces(what, &format!("exited with {status}: {}", stderr.trim()));
        }
        // `unshare` execs `sleep` once the namespaces exist.
        if std::fs::read_to_string(format!("/proc/{}/comm", child.id())).is_ok_and(|c| c.trim() == "sleep") {
            return child;
        }
        if start.elapsed() > Duration::from_secs(20) {
            no_namespaces(what, "the namespace holder did not start within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `args` inside the namespaces of `pid`; fails the test with its output unless it succeeds.
fn run_in(pid: u32, args: &[&str]) -> Output {
    let wrapper = enter(pid);
    let out = Command::new(&wrapper[0]).args(&wrapper[1..]).args(args).output().unwrap_or_else(|e| no_namespaces(&args.join(" "), &e.to_string()));
    if !out.status.success() {
        no_namespaces(&args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    out
}

/// Two network namespaces joined by a veth pair: `servers` (loopback up, `SERVERS_IP`) and
/// `worker` (`WORKER_B_IP`). Returns the holders' process ids.
fn make_namespaces(procs: &mut KillOnDrop) -> (u32, u32) {
    let mut servers = Command::new("unshare");
    servers.args(["-rn", "sleep", "300"]);
    let servers = hold(servers, "unshare -rn (the servers' namespace)");
    let servers_pid = servers.id();
    procs.push(servers, "servers namespace");
    // Made from inside the first user namespace, so moving the veth end between them is allowed.
    let wrapper = enter(servers_pid);
    let mut worker = Command::new(&wrapper[0]);
    worker.args(&wrapper[1..]).args(["unshare", "-n", "sleep", "300"]);
    let worker = hold(worker, "unshare -n (worker B's namespace)");
    let worker_pid = worker.id();
    procs.push(worker, "worker namespace");

    let ip = ip_binary();
    let pid = worker_pid.to_string();
    run_in(servers_pid, &[ip, "link", "set", "lo", "up"]);
    run_in(servers_pid, &[ip, "link", "add", LINK, "type", "veth", "peer", "name", PEER]);
    run_in(servers_pid, &[ip, "link", "set", PEER, "netns", &pid]);
    run_in(servers_pid, &[ip, "addr", "add", &format!("{SERVERS_IP}/24"), "dev", LINK]);
    run_in(servers_pid, &[ip, "link", "set", LINK, "up"]);
    run_in(worker_pid, &[ip, "link", "set", "lo", "up"]);
    run_in(worker_pid, &[ip, "addr", "add", &format!("{WORKER_B_IP}/24"), "dev", PEER]);
    run_in(worker_pid, &[ip, "link", "set", PEER, "up"]);
    (servers_pid, worker_pid)
}

/// Takes the servers' end of the link down or up. Down, the servers have no route to B, and B's
/// end has no carrier: what B sends is dropped silently.
fn set_link(servers_pid: u32, up: bool) {
    run_in(servers_pid, &[ip_binary(), "link", "set", LINK, if up { "up" } else { "down" }]);
}

/// The span naming the lease of a worker's log line (`lease{lease=0-2 `), trailing space
/// included so that lease 0-2 does not match 0-20.
fn lease_span(line: &str) -> String {
    let start = line.find("lease{lease=").unwrap_or_else(|| panic!("no lease span in {line:?}"));
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or_else(|| panic!("no lease span in {line:?}"));
    rest[..=end].to_string()
}

/// Waits until `cond` holds, failing with `what` after the common limit.
fn wait_until(c: &Cluster, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < common::LIMIT, "{what} did not happen in time; logs in {}", c.dir.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_worker_cut_off_by_a_partition_returns_and_nothing_is_trained_twice() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = KillOnDrop(Vec::new());
    let (servers_pid, worker_pid) = make_namespaces(&mut procs);
    let spec = Spec {
        // Enough steps that B, back after the partition, still finds work.
        prompts: 24,
        lease_ttl_s: 3.0,
        heartbeat_interval_s: 0.5,
        listen_ip: "0.0.0.0".into(),
        ports: Some((COORDINATOR_PORT, LEARNER_PORT)),
        ..Spec::default()
    };
    let c = Cluster::with(tmp.path(), spec);
    let (servers, worker_ns) = (enter(servers_pid), enter(worker_pid));

    procs.push(c.command(&servers, "coordinator", "coordinator").spawn().expect("coordinator starts"), "coordinator");
    c.wait_log("coordinator", "coordinator serving", 1);
    procs.push(c.command(&servers, "learner", "learner").spawn().expect("learner starts"), "learner");
    procs.push(c.command(&servers, "worker", "worker-a").spawn().expect("worker A starts"), "worker-a");
    let mut b = c.command(&worker_ns, "worker", "worker-b");
    b.args(["--set", &format!("cluster.coordinator=http://{SERVERS_IP}:{COORDINATOR_PORT}")])
        .args(["--set", &format!("cluster.learner=http://{SERVERS_IP}:{LEARNER_PORT}")])
        // `lease granted` is a debug line of the worker.
        .env("RUST_LOG", "info,medrl_rollout=debug");
    procs.push(b.spawn().expect("worker B starts"), "worker-b");

    // Cut B off while it holds a lease. Sampling a group takes tens of milliseconds, so the lease
    // may have closed before the link went down: then the link comes back and B's next lease is
    // tried.
    let mut tries = 0;
    let lease = loop {
        tries += 1;
        assert!(tries <= 10, "B never held a lease when the link went down; logs in {}", c.dir.display());
        c.wait_log("worker-b", "lease granted", tries);
        set_link(servers_pid, false);
        let log = c.log("worker-b");
        let granted = log.lines().filter(|l| l.contains("lease granted")).nth(tries - 1).expect("the line waited for");
        let lease = lease_span(granted);
        if !log.lines().any(|l| l.contains(&lease) && (l.contains("lease acked") || l.contains("lease ack refused"))) {
            break lease;
        }
        set_link(servers_pid, true);
    };
    let cut_at = Instant::now();
    let steps_at_cut = c.steps_done();
    wait_until(&c, "the coordinator declaring B dead", || c.log("coordinator").contains("declared dead"));
    // B's prompt was in the step after `steps_at_cut` (or the one being logged): once two more
    // steps are logged, A's retry of it has been trained.
    wait_until(&c, "two steps without B", || c.steps_done() >= steps_at_cut + 2);
    set_link(servers_pid, true);
    let cut_for = cut_at.elapsed();

    for (child, name) in procs.0.iter_mut().skip(2) {
        wait_exit(child, name, &c.dir);
    }
    c.assert_exactly_once();
    c.assert_data_order(usize::MAX);

    let b_log = c.log("worker-b");
    // B's lease from before the cut was acked after it (late) and counted nothing again.
    let acks: Vec<&str> = b_log.lines().filter(|l| l.contains(&lease) && l.contains("lease acked")).collect();
    assert!(!acks.is_empty() && acks.iter().all(|l| l.contains("delivered=0")), "B's lease from before the partition: {acks:?}");
    // B learnt it had been forgotten, registered again and went back to work.
    let rejoined = b_log.find("no longer knows this worker; registering again").unwrap_or_else(|| panic!("B never registered again: {b_log}"));
    assert!(b_log[rejoined..].contains("registered with the coordinator"), "{b_log}");
    assert!(b_log[rejoined..].contains("group sampled"), "B sampled nothing after the partition: {b_log}");
    // What took which path, for the record (the timing decides, not the test).
    let late = acks.iter().any(|l| l.contains("late=true"));
    let group = b_log.lines().find(|l| l.contains(&lease) && l.contains("group delivered")).map(|l| l.rsplit(": ").next().unwrap_or(l));
    eprintln!(
        "partition: link down {cut_for:.1?} (cut try {tries}); B's lease {} acked late: {late}; its group: {}; run {:.1?}",
        lease.trim(),
        group.unwrap_or("not delivered"),
        started.elapsed()
    );
}
