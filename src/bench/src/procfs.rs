//! CPU and memory from /proc: the pgrelay under test (its RSS, peak RSS and
//! CPU seconds), our throwaway PostgreSQL (the postmaster and its children),
//! the bench itself and the whole machine, so that a report can say who
//! used the cores while it measured.

use std::time::Instant;

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

/// CPU seconds of a PostgreSQL server: the postmaster (first line of
/// `postmaster.pid`) and its children (backends, walwriter, ...).
pub(crate) fn postgres_cpu_s(data_dir: &std::path::Path) -> Option<f64> {
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let postmaster: u32 = pid_file.lines().next()?.trim().parse().ok()?;
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid: u32 = fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        if pid == postmaster || ppid == postmaster {
            let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            total += (utime + stime) / USER_HZ;
        }
    }
    Some(total)
}

/// Busy CPU seconds of the whole machine, all cores (from /proc/stat).
pub(crate) fn machine_busy_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let busy: f64 =
        v.iter().take(8).sum::<f64>() - v.get(3).unwrap_or(&0.0) - v.get(4).unwrap_or(&0.0);
    busy / USER_HZ
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) at: Instant,
    pub(crate) machine_s: f64,
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
            machine_s: machine_busy_s(),
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

/// CPU use between two samples, in % of one core.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Load {
    seconds: f64,
    load1_before: f64,
    machine_pct: f64,
    pgrelay_pct: f64,
    postgres_pct: f64,
    bench_pct: f64,
    /// Everything else: other sessions' builds and tests, kernel threads.
    others_pct: f64,
}

impl Load {
    pub(crate) fn between(a: &Usage, b: &Usage) -> Load {
        let seconds = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
        let pct = |x: f64| x / seconds * 100.0;
        let d = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => (y - x).max(0.0),
            _ => 0.0,
        };
        let machine = b.machine_s - a.machine_s;
        let bench = b.bench_s - a.bench_s;
        let pgrelay = d(a.pgrelay_s, b.pgrelay_s);
        let postgres = d(a.postgres_s, b.postgres_s);
        Load {
            seconds,
            load1_before: a.load1,
            machine_pct: pct(machine),
            pgrelay_pct: pct(pgrelay),
            postgres_pct: pct(postgres),
            bench_pct: pct(bench),
            others_pct: pct((machine - bench - pgrelay - postgres).max(0.0)),
        }
    }

    pub(crate) fn line(&self) -> String {
        format!(
            "load1 {:.2} before; over {:.1} s the machine was {:.0}% busy (of {}%): \
             pgrelay {:.0}%, PostgreSQL {:.0}%, bench {:.0}%, others {:.0}%",
            self.load1_before,
            self.seconds,
            self.machine_pct,
            100 * std::thread::available_parallelism().map_or(1, |n| n.get()),
            self.pgrelay_pct,
            self.postgres_pct,
            self.bench_pct,
            self.others_pct
        )
    }
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
