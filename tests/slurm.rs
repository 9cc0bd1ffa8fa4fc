//! A real Slurm, not a mock: this test starts a one-node cluster (munged, slurmctld, slurmd from
//! Debian's packages, installed if missing) as its own child processes, submits the tiny sweep in
//! `tests/fixtures/sweeps/cluster.toml` with `xrun submit --slurm`, and checks that the merged
//! results equal a local `xrun run` of the same file; then it cancels one array task and checks
//! that `xrun submit --retry-failed` completes the sweep. Every daemon is stopped by PID when the
//! test ends, also when it fails.
//!
//! It needs root (to install the packages and start the daemons) or the packages already installed
//! and a root shell. `XRUN_SKIP_SLURM=1` skips it, saying so.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::text;

const XRUN: &str = env!("CARGO_BIN_EXE_xrun");
const FIXTURE: &str = "tests/fixtures/sweeps/cluster.toml";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The daemons of a one-node cluster, stopped by PID when dropped.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    daemons: Vec<(&'static str, Child)>,
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn xrun(&self, args: &[&str]) -> Output {
        self.command(XRUN)
            .current_dir(root())
            .args(args)
            .env_remove("XRUN_DATA_ROOT")
            .output()
            .expect("xrun runs")
    }

    fn queue(&self) -> String {
        let o = self
            .command("squeue")
            .args(["-h", "-r", "-o", "%i %T %r"])
            .output()
            .unwrap();
        assert!(o.status.success(), "squeue: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Waits until no job is queued or running.
    fn drain(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let q = self.queue();
            if q.trim().is_empty() {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "jobs still queued after {timeout:?}:\n{q}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["slurmctld.log", "slurmd.log"] {
            let log = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            out.push_str(&format!("--- {name} (last lines)\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Cancel every job first, so that no job outlives the daemons.
        let _ = self
            .command("scancel")
            .args(["--full", "--user", "root"])
            .stderr(Stdio::null())
            .status();
        for (_, child) in self.daemons.iter_mut().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (name, child) in self.daemons.iter_mut().rev() {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Ok(None) = child.try_wait() {
                eprintln!("{name} did not stop on SIGTERM; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs the packages when they are missing; starts munged, slurmctld and slurmd.
fn start_cluster() -> Cluster {
    let needed = ["slurmctld", "slurmd", "sbatch", "munged"];
    assert!(
        is_root(),
        "the Slurm test starts munged, slurmctld and slurmd and needs root; run it as root or set \
         XRUN_SKIP_SLURM=1 to skip it"
    );
    if !needed.iter().all(|p| have(p)) {
        common::apt_install(
            &["slurmctld", "slurmd", "slurm-client", "munge"],
            "XRUN_SKIP_SLURM",
        );
    }
    let dir = std::env::temp_dir().join(format!("xrun-slurm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["state", "spool", "munge"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let munge = dir.join("munge");
    let chown = Command::new("chown")
        .args(["munge:munge", munge.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(chown.success());
    let socket = munge.join("munge.socket");
    let host = String::from_utf8_lossy(&Command::new("hostname").output().unwrap().stdout)
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let d = dir.display();
    let conf = format!(
        "ClusterName=xrun-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
AuthInfo=socket={socket}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0,bf_interval=1
DependencyParameters=kill_invalid_depend
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ReturnToService=2
SlurmUser=root
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
",
        ctld = free_port(),
        slurmd = free_port(),
        socket = socket.display(),
    );
    let conf_path = dir.join("slurm.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut cluster = Cluster {
        dir: dir.clone(),
        conf: conf_path,
        daemons: Vec::new(),
    };
    let spawn = |c: &mut Command, log: &str| {
        c.stdout(std::fs::File::create(dir.join(log)).unwrap())
            .stderr(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("{log}.err"))).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {c:?}: {e}"))
    };
    let munged = spawn(
        Command::new("setpriv")
            .args([
                "--reuid=munge",
                "--regid=munge",
                "--init-groups",
                "munged",
                "-F",
            ])
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
            .arg(format!("--seed-file={}", munge.join("seed").display()))
            .arg(format!("--log-file={}", munge.join("munged.log").display())),
        "munged.out",
    );
    cluster.daemons.push(("munged", munged));
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "munged did not create its socket: {}",
            std::fs::read_to_string(dir.join("munged.out.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ctld = spawn(
        cluster.command("slurmctld").args(["-D", "-i"]),
        "slurmctld.out",
    );
    cluster.daemons.push(("slurmctld", ctld));
    let slurmd = spawn(cluster.command("slurmd").arg("-D"), "slurmd.out");
    cluster.daemons.push(("slurmd", slurmd));
    let start = Instant::now();
    loop {
        let o = cluster
            .command("sinfo")
            .args(["-h", "-o", "%T"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&o.stdout).contains("idle") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the node did not come up: {}\n{}",
            text(&o),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "slurm: one-node cluster up in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    cluster
}

fn out_set(out: &Path) -> String {
    format!("experiment.output_dir={}", out.display())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn jobs(run: &Path) -> Vec<serde_json::Value> {
    read(&run.join("slurm/jobs.jsonl"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn journal_events(run: &Path, stage: &str, event: &str) -> usize {
    read(&run.join("journal.jsonl"))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["stage"] == stage && e["event"] == event)
        .count()
}

#[test]
fn a_sweep_submitted_to_slurm_merges_to_the_local_results() {
    if std::env::var("XRUN_SKIP_SLURM").is_ok_and(|v| v == "1") {
        eprintln!("skipped: XRUN_SKIP_SLURM=1");
        return;
    }
    let tmp = std::env::temp_dir().join(format!("xrun-slurm-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // The reference: the same file run locally, in one process.
    let local = tmp.join("local");
    let o = Command::new(XRUN)
        .current_dir(root())
        .args([FIXTURE, "--quiet", "--set", &out_set(&local)])
        .env_remove("XRUN_DATA_ROOT")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let expected = read(&local.join("cluster_tiny/results.csv"));

    let cluster = start_cluster();

    // --dry-run prints the graph and the scripts and submits nothing.
    let a = tmp.join("a");
    let o = cluster.xrun(&[
        "submit",
        FIXTURE,
        "--slurm",
        "--dry-run",
        "--set",
        &out_set(&a),
    ]);
    let dry = text(&o);
    eprintln!("--- xrun submit --dry-run\n{dry}");
    assert!(o.status.success(), "{dry}");
    assert!(dry.contains("job 1: tokenizer-"), "{dry}");
    assert!(
        dry.contains("job 2: pretrain-") && dry.contains("after job 1"),
        "{dry}"
    );
    assert!(dry.contains("job 3: trials - array of 4 trials"), "{dry}");
    assert!(dry.contains("#SBATCH --array=0-3"), "{dry}");
    assert!(dry.contains("--dependency=afterok:<job 2>"), "{dry}");
    assert!(cluster.queue().trim().is_empty());
    assert!(!a.join("cluster_tiny/slurm/jobs.jsonl").exists());

    // Options from the file (here through --set) and the command line reach every script.
    let passthrough = [
        "--time",
        "00:30:00",
        "--sbatch=--comment=xrun-test",
        "--set",
        "cluster.slurm.setup=[\"echo setup-ran\"]",
    ];
    let set_a = out_set(&a);
    let mut args = vec!["submit", FIXTURE, "--slurm", "--dry-run"];
    args.extend_from_slice(&passthrough);
    args.extend_from_slice(&["--set", &set_a]);
    let dry = text(&cluster.xrun(&args));
    for wanted in [
        "#SBATCH --time=00:30:00",
        "#SBATCH --comment=xrun-test",
        "\necho setup-ran\n",
    ] {
        assert_eq!(
            dry.matches(wanted).count(),
            3,
            "{wanted} in every script:\n{dry}"
        );
    }

    // One submit: a tokenizer job, a pretraining job after it, an array of 4 trials after that.
    let mut args = vec!["submit", FIXTURE, "--slurm"];
    args.extend_from_slice(&passthrough);
    args.extend_from_slice(&["--set", &set_a]);
    let o = cluster.xrun(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("submitted 3 jobs"), "{}", text(&o));
    // A second submit while they run refuses and points at status and --retry-failed.
    let o = cluster.xrun(&["submit", FIXTURE, "--slurm", "--set", &out_set(&a)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--retry-failed"), "{}", text(&o));
    cluster.drain(Duration::from_secs(300));
    let run_a = a.join("cluster_tiny");
    let logs: Vec<PathBuf> = std::fs::read_dir(run_a.join("slurm/logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(logs.len(), 6, "{logs:?}");
    for log in &logs {
        assert!(read(log).starts_with("setup-ran\n"), "{}", log.display());
    }
    let status = text(&cluster.xrun(&["status", FIXTURE, "--set", &out_set(&a)]));
    assert!(status.contains("4 trials: 4 done"), "{status}");
    // Every shared stage ran once, in its own job; the trials reused it.
    assert_eq!(journal_events(&run_a, "tokenizer", "done"), 1);
    assert_eq!(journal_events(&run_a, "pretrain", "done"), 1);
    assert_eq!(journal_events(&run_a, "finetune", "done"), 4);
    assert_eq!(read(&run_a.join("results.csv")), expected);
    let o = cluster.xrun(&["report", FIXTURE, "--set", &out_set(&a)]);
    assert!(
        o.status.success() && !text(&o).contains("partial"),
        "{}",
        text(&o)
    );
    assert_eq!(read(&run_a.join("results.csv")), expected);
    assert!(!read(&run_a.join("index.html")).contains("Partial report"));
    let o = cluster.xrun(&["submit", FIXTURE, "--slurm", "--set", &out_set(&a)]);
    assert!(text(&o).contains("nothing to submit"), "{}", text(&o));

    // Cancel one array task while the array waits for the pretraining job: the other three finish,
    // status names the lost trial's job and log, and --retry-failed submits that trial alone.
    let b = tmp.join("b");
    let run_b = b.join("cluster_tiny");
    let o = cluster.xrun(&["submit", FIXTURE, "--slurm", "--set", &out_set(&b)]);
    assert!(o.status.success(), "{}", text(&o));
    let array = jobs(&run_b)
        .into_iter()
        .find(|j| j["array"] == true)
        .unwrap();
    let task = format!("{}_1", array["job_id"].as_str().unwrap());
    let lost = array["trials"][1].as_str().unwrap().to_string();
    let o = cluster.command("scancel").arg(&task).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    cluster.drain(Duration::from_secs(300));
    let status = text(&cluster.xrun(&["status", FIXTURE, "--set", &out_set(&b)]));
    eprintln!("--- xrun status after a cancelled task\n{status}");
    assert!(status.contains("4 trials: 3 done, 1 failed"), "{status}");
    let line = status.lines().find(|l| l.starts_with(&lost)).unwrap();
    assert!(line.contains("failed") && line.contains(&task), "{status}");
    // It was cancelled before it started, so it wrote no log; the others did.
    assert!(line.contains("no log: it never started"), "{status}");
    assert!(!run_b.join(format!("slurm/logs/trials-{task}.out")).exists());
    let first = format!("{}_0", array["job_id"].as_str().unwrap());
    assert!(run_b
        .join(format!("slurm/logs/trials-{first}.out"))
        .is_file());
    let o = cluster.xrun(&["report", FIXTURE, "--set", &out_set(&b)]);
    assert!(text(&o).contains("partial report: 3 of 4"), "{}", text(&o));
    assert!(read(&run_b.join("index.html")).contains("Partial report"));
    let o = cluster.xrun(&[
        "submit",
        FIXTURE,
        "--slurm",
        "--retry-failed",
        "--set",
        &out_set(&b),
    ]);
    let retry = text(&o);
    assert!(o.status.success(), "{retry}");
    assert!(
        retry.contains(&format!("array of 1 trial: {lost}")),
        "{retry}"
    );
    assert!(retry.contains("submitted 1 job"), "{retry}");
    cluster.drain(Duration::from_secs(300));
    let status = text(&cluster.xrun(&["status", FIXTURE, "--set", &out_set(&b)]));
    assert!(status.contains("4 trials: 4 done"), "{status}");
    assert_eq!(journal_events(&run_b, "pretrain", "done"), 1);
    let o = cluster.xrun(&["report", FIXTURE, "--set", &out_set(&b)]);
    assert!(
        o.status.success() && !text(&o).contains("partial"),
        "{}",
        text(&o)
    );
    assert_eq!(read(&run_b.join("results.csv")), expected);
    drop(cluster);
    // With the cluster gone, status still reads every result; only the queue is unknown.
    let o = Command::new(XRUN)
        .current_dir(root())
        .args(["status", FIXTURE, "--set", &out_set(&b)])
        .env("SLURM_CONF", tmp.join("no-such-slurm.conf"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("4 trials: 4 done"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&tmp);
}
