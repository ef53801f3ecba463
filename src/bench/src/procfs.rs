//! CPU and memory from /proc: the pgrelay under test (its RSS, peak RSS and
//! CPU seconds), our throwaway PostgreSQL (the postmaster and its children),
//! the bench itself and the whole machine, so that a report can say who
//! used the cores while it measured.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcSample {
    /// utime + stime, seconds.
    pub(crate) cpu_s: f64,
    pub(crate) rss_kib: u64,
    pub(crate) hwm_kib: u64,
}

/// Linux reports /proc times in USER_HZ, which is 100 on every architecture.
const USER_HZ: f64 = 100.0;

pub(crate) fn proc_sample(pid: Option<u32>) -> Option<ProcSample> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}"),
        None => "/proc/self".to_owned(),
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_s: (utime + stime) / USER_HZ,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// One process's CPU, from its /proc/PID/stat.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProcCpu {
    pub(crate) pid: u32,
    pub(crate) ppid: u32,
    /// The command name (`comm`, at most 15 bytes).
    pub(crate) comm: String,
    /// utime + stime, seconds.
    pub(crate) cpu_s: f64,
}

/// A /proc/PID/stat line: the process's parent, name and CPU seconds. The
/// name is between the first `(` and the last `)` (it may hold spaces and
/// parentheses itself).
fn parse_stat(pid: u32, stat: &str) -> Option<ProcCpu> {
    let open = stat.find('(')?;
    let (name, rest) = stat.get(open + 1..)?.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(ProcCpu {
        pid,
        ppid: fields.get(1)?.parse().ok()?,
        comm: name.to_owned(),
        cpu_s: (utime + stime) / USER_HZ,
    })
}

/// Every process's CPU seconds so far (those that exit while it reads are
/// left out).
pub(crate) fn processes() -> Vec<ProcCpu> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            parse_stat(pid, &stat)
        })
        .collect()
}

/// The postmaster's pid (first line of `postmaster.pid`).
pub(crate) fn postmaster_pid(data_dir: &std::path::Path) -> Option<u32> {
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    pid_file.lines().next()?.trim().parse().ok()
}

/// Whether `p` is the postmaster `postmaster` or one of its children
/// (backends, walwriter, ...).
pub(crate) fn is_postgres(p: &ProcCpu, postmaster: u32) -> bool {
    p.pid == postmaster || p.ppid == postmaster
}

/// CPU seconds of a PostgreSQL server: the postmaster and its children.
pub(crate) fn postgres_cpu_s(data_dir: &std::path::Path) -> Option<f64> {
    let postmaster = postmaster_pid(data_dir)?;
    Some(
        processes()
            .iter()
            .filter(|p| is_postgres(p, postmaster))
            .map(|p| p.cpu_s)
            .sum(),
    )
}

/// The soft open-file limit of a process (`None`: this one), from
/// /proc/PID/limits.
pub(crate) fn nofile_limit(pid: Option<u32>) -> Option<u64> {
    let dir = pid.map_or_else(|| "/proc/self".to_owned(), |pid| format!("/proc/{pid}"));
    parse_nofile(&std::fs::read_to_string(format!("{dir}/limits")).ok()?)
}

/// The soft open-file limits of the bench and its pgrelay: each socket is
/// a descriptor on both sides, and the child pgrelay inherits the limit the
/// bench raised.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct OpenFiles {
    pub(crate) bench: Option<u64>,
    pub(crate) pgrelay: Option<u64>,
}

impl OpenFiles {
    pub(crate) fn read(pgrelay: Option<u32>) -> OpenFiles {
        OpenFiles {
            bench: nofile_limit(None),
            pgrelay: pgrelay.and_then(|pid| nofile_limit(Some(pid))),
        }
    }

    /// `bench 20000, pgrelay 20000`.
    pub(crate) fn line(&self) -> String {
        let show = |n: Option<u64>| n.map_or("?".into(), |n| n.to_string());
        format!("bench {}, pgrelay {}", show(self.bench), show(self.pgrelay))
    }

    /// Warnings (on stderr) for a limit below `needed` files.
    pub(crate) fn warn_below(&self, needed: usize) {
        for (who, limit) in [("the bench", self.bench), ("pgrelay", self.pgrelay)] {
            if let Some(limit) = limit.filter(|&l| l < needed as u64) {
                eprintln!(
                    "pgrelay-bench: warning: {who}'s open-file limit is {limit}, below the \
                     {needed} this run needs; raise the hard limit (ulimit -Hn)"
                );
            }
        }
    }
}

/// `Max open files            20000                20000                files`.
fn parse_nofile(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.strip_prefix("Max open files")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The whole machine's CPU seconds so far, all cores (/proc/stat).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct MachineCpu {
    /// Everything but idle and iowait.
    pub(crate) busy_s: f64,
    /// Interrupts and softirqs: part of `busy_s` that no process is charged
    /// with. Loopback TCP's receive path runs here, so the bench's own
    /// traffic shows up in it.
    pub(crate) irq_s: f64,
    /// Time the hypervisor gave to other guests: part of `busy_s`.
    pub(crate) steal_s: f64,
}

/// The `cpu` line of /proc/stat.
fn parse_cpu_line(stat: &str) -> Option<MachineCpu> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0.0) / USER_HZ;
    // user nice system idle iowait irq softirq steal (guest time is in user).
    Some(MachineCpu {
        busy_s: (0..8).map(at).sum::<f64>() - at(3) - at(4),
        irq_s: at(5) + at(6),
        steal_s: at(7),
    })
}

/// The machine's CPU seconds so far (zeros when /proc/stat cannot be read).
pub(crate) fn machine_cpu() -> MachineCpu {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_cpu_line(&s))
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) at: Instant,
    pub(crate) machine: MachineCpu,
    pub(crate) bench_s: f64,
    pub(crate) pgrelay_s: Option<f64>,
    pub(crate) postgres_s: Option<f64>,
    load1: f64,
}

impl Usage {
    /// Now, with pgrelay's pid and our PostgreSQL's CPU seconds (if ours).
    pub(crate) fn sample(pgrelay: Option<u32>, postgres_s: Option<f64>) -> Usage {
        Usage {
            at: Instant::now(),
            machine: machine_cpu(),
            bench_s: proc_sample(None).map_or(0.0, |s| s.cpu_s),
            pgrelay_s: proc_sample(pgrelay).map(|s| s.cpu_s),
            postgres_s,
            load1: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or(0.0),
        }
    }
}

/// The machine's busy time that is none of the run's: busy minus
/// interrupts (charged to no process; the run's loopback traffic is most of
/// it) minus the bench, pgrelay and PostgreSQL. Never below 0 (the
/// per-process figures are tick-sampled, so it can come out slightly
/// negative).
pub(crate) fn others_busy_s(machine: &MachineCpu, ours_s: f64) -> f64 {
    (machine.busy_s - machine.irq_s - ours_s).max(0.0)
}

/// CPU use between two samples, in % of one core.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Load {
    pub(crate) seconds: f64,
    load1_before: f64,
    machine_pct: f64,
    pub(crate) pgrelay_pct: f64,
    postgres_pct: f64,
    pub(crate) bench_pct: f64,
    /// Interrupts and softirqs (in `machine_pct`, in no process).
    irq_pct: f64,
    /// Stolen by the hypervisor (in `machine_pct` and `others_pct`).
    steal_pct: f64,
    /// Everything else ([`others_busy_s`]): other sessions' builds and
    /// tests, kernel threads, steal.
    pub(crate) others_pct: f64,
}

impl Load {
    pub(crate) fn between(a: &Usage, b: &Usage) -> Load {
        let seconds = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
        let pct = |x: f64| x / seconds * 100.0;
        let d = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => (y - x).max(0.0),
            _ => 0.0,
        };
        let machine = MachineCpu {
            busy_s: b.machine.busy_s - a.machine.busy_s,
            irq_s: b.machine.irq_s - a.machine.irq_s,
            steal_s: b.machine.steal_s - a.machine.steal_s,
        };
        let bench = b.bench_s - a.bench_s;
        let pgrelay = d(a.pgrelay_s, b.pgrelay_s);
        let postgres = d(a.postgres_s, b.postgres_s);
        Load {
            seconds,
            load1_before: a.load1,
            machine_pct: pct(machine.busy_s),
            pgrelay_pct: pct(pgrelay),
            postgres_pct: pct(postgres),
            bench_pct: pct(bench),
            irq_pct: pct(machine.irq_s),
            steal_pct: pct(machine.steal_s),
            others_pct: pct(others_busy_s(&machine, bench + pgrelay + postgres)),
        }
    }

    pub(crate) fn line(&self) -> String {
        format!(
            "load1 {:.2} before; over {:.1} s the machine was {:.0}% busy (of {}%): \
             pgrelay {:.0}%, PostgreSQL {:.0}%, bench {:.0}%, interrupts {:.0}%, others {:.0}% \
             (steal {:.0}%)",
            self.load1_before,
            self.seconds,
            self.machine_pct,
            100 * std::thread::available_parallelism().map_or(1, |n| n.get()),
            self.pgrelay_pct,
            self.postgres_pct,
            self.bench_pct,
            self.irq_pct,
            self.others_pct,
            self.steal_pct,
        )
    }
}

/// A process's highest RSS while it lives, sampled every 20 ms: VmHWM is
/// the peak of the process's whole life, and a phase wants its own.
pub(crate) struct PeakRss {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    pub(crate) fn start(pid: Option<u32>) -> PeakRss {
        let rss = move || proc_sample(pid).map_or(0, |s| s.rss_kib);
        let peak = Arc::new(AtomicU64::new(rss()));
        let task = {
            let peak = Arc::clone(&peak);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                loop {
                    tick.tick().await;
                    peak.fetch_max(rss(), Relaxed);
                }
            })
        };
        PeakRss { peak, task }
    }

    /// The highest RSS so far, KiB.
    pub(crate) fn kib(&self) -> u64 {
        self.peak.load(Relaxed)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        let stat = "4242 (tokio (rt) 1) S 17 4242 17 0 -1 4194560 2337 0 0 0 150 50 0 0 20 0 3 0";
        assert_eq!(
            parse_stat(4242, stat),
            Some(ProcCpu {
                pid: 4242,
                ppid: 17,
                comm: "tokio (rt) 1".into(),
                cpu_s: 2.0,
            })
        );
        assert_eq!(parse_stat(1, "1 (init) S"), None);
        assert_eq!(parse_stat(1, ""), None);
    }

    #[test]
    fn cpu_line_and_others() {
        let stat = "cpu  700 100 200 5000 50 10 40 30 0 0\ncpu0 1 2 3 4\n";
        let m = parse_cpu_line(stat).expect("cpu line");
        // user + nice + system + irq + softirq + steal, in seconds.
        assert!((m.busy_s - 10.8).abs() < 1e-9, "{m:?}");
        assert!((m.irq_s - 0.5).abs() < 1e-9);
        assert!((m.steal_s - 0.3).abs() < 1e-9);
        assert_eq!(parse_cpu_line("intr 1 2 3"), None);
        // Busy 10.8 s, 0.5 s of it interrupts, 8 s ours: 2.3 s others.
        assert!((others_busy_s(&m, 8.0) - 2.3).abs() < 1e-9);
        // Tick sampling can make ours exceed the machine's: 0, not negative.
        assert_eq!(others_busy_s(&m, 11.0), 0.0);
    }

    #[test]
    fn open_file_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             95324                95324                processes\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_nofile(limits), Some(20000));
        assert_eq!(parse_nofile("Max processes 1 1"), None);
    }
}
