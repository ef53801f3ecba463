//! The quiet-machine check every measuring scenario makes: on a shared
//! machine another session's build can take a core away from pgrelay in the
//! middle of a run, and the figures then measure the build. Before the
//! measured phase (after setup, with pgrelay and PostgreSQL idle) the bench
//! samples /proc for [`SAMPLE`] and computes what the machine was busy with
//! besides the bench, its pgrelay and its PostgreSQL
//! ([`crate::procfs::others_busy_s`]). Above `--quiet-max-busy` (% of one
//! core) it refuses to measure (exit 3, naming the busiest other
//! processes), unless `--allow-noisy`, which runs on and marks the report
//! NOISY. The same figure over the measured window marks a run NOISY too
//! (a window shorter than [`SAMPLE`] is not judged: at 10 ms a tick, a 40 ms
//! window's figure is ±50%), and both name the busiest other processes
//! alive at the end, so that a NOISY run says who.
//! One [`Quiet`] per run, made by [`check`]; each measured window is a
//! [`Window`] from [`Window::open`] to [`Quiet::close`], so that every
//! scenario judges alike.

use std::collections::HashMap;
use std::time::Duration;

use crate::args::Args;
use crate::error::{BenchError, Result};
use crate::procfs::{is_postgres, postmaster_pid, processes, Load, ProcCpu, Usage};
use crate::server::Server;
use crate::stats::row;

/// How long the check samples: long enough for /proc's 10 ms ticks to say
/// something (1% of one core is a tick), short enough not to matter.
const SAMPLE: Duration = Duration::from_secs(1);

/// How many of the busiest other processes the check names.
const BUSIEST: usize = 3;

/// The check before the measured phase and the others' share during it.
#[derive(Debug, Clone)]
pub(crate) struct Quiet {
    /// The sample before the measured phase.
    before: Load,
    /// --quiet-max-busy: % of one core.
    threshold_pct: f64,
    /// The busiest other processes during the sample: (name, pid, % of one core).
    busiest: Vec<(String, u32, f64)>,
    /// The others' share over the measured window (the highest, when a
    /// scenario has several).
    window_others_pct: Option<f64>,
    /// The busiest other processes in that window.
    window_busiest: Vec<(String, u32, f64)>,
    /// Windows too short to judge.
    short_windows: usize,
}

/// A measured window being watched: who used the CPU from its start.
pub(crate) struct Window {
    ours: Ours,
    others: Vec<ProcCpu>,
    /// The CPU counters at the start.
    pub(crate) start: Usage,
}

impl Window {
    /// The window starts now.
    pub(crate) fn open(server: &Server) -> Window {
        let ours = Ours::new(server);
        // The process table first, so that reading it is not in the window.
        let others = ours.others();
        Window {
            ours,
            others,
            start: server.usage(),
        }
    }
}

/// Samples the machine for [`SAMPLE`] with the run idle; refuses (an error,
/// exit 3) when others used more than --quiet-max-busy, unless
/// --allow-noisy.
pub(crate) async fn check(args: &Args, server: &Server) -> Result<Quiet> {
    let ours = Ours::new(server);
    let first = ours.others();
    let a = server.usage();
    tokio::time::sleep(SAMPLE).await;
    let b = server.usage();
    let quiet = Quiet {
        before: Load::between(&a, &b),
        threshold_pct: args.quiet_max_busy,
        busiest: busiest(&first, &ours.others(), a.at.elapsed().as_secs_f64()),
        window_others_pct: None,
        window_busiest: Vec::new(),
        short_windows: 0,
    };
    eprintln!("quiet check: {}", quiet.before.line());
    if quiet.before_noisy() && !args.allow_noisy {
        return Err(BenchError::Noisy(format!(
            "the machine is not quiet: other processes used {:.0}% of one core over {:.1} s \
             before the measured phase, above --quiet-max-busy {:.0}% (busiest: {}); \
             wait for them to finish, or pass --allow-noisy to measure anyway (the report \
             is then marked NOISY)",
            quiet.before.others_pct,
            quiet.before.seconds,
            quiet.threshold_pct,
            quiet.busiest_line()
        )));
    }
    if quiet.before_noisy() {
        eprintln!("quiet check: NOISY, going on (--allow-noisy)");
    }
    Ok(quiet)
}

/// Who is the run: this process, its pgrelay, its PostgreSQL.
struct Ours {
    bench: u32,
    pgrelay: Option<u32>,
    postmaster: Option<u32>,
}

impl Ours {
    fn new(server: &Server) -> Ours {
        Ours {
            bench: std::process::id(),
            pgrelay: server.pid,
            postmaster: server.data_dir().and_then(postmaster_pid),
        }
    }

    fn is_ours(&self, p: &ProcCpu) -> bool {
        p.pid == self.bench
            || Some(p.pid) == self.pgrelay
            || self.postmaster.is_some_and(|pm| is_postgres(p, pm))
    }

    /// Every other process's CPU seconds so far.
    fn others(&self) -> Vec<ProcCpu> {
        let mut all = processes();
        all.retain(|p| !self.is_ours(p));
        all
    }
}

/// The processes that used the most CPU between two readings `seconds`
/// apart, in % of one core, those under 1% left out.
fn busiest(before: &[ProcCpu], after: &[ProcCpu], seconds: f64) -> Vec<(String, u32, f64)> {
    let before: HashMap<u32, f64> = before.iter().map(|p| (p.pid, p.cpu_s)).collect();
    let mut used: Vec<(String, u32, f64)> = after
        .iter()
        .map(|p| {
            // A process born during the sample used all it has.
            let was = before.get(&p.pid).copied().unwrap_or(0.0);
            let pct = (p.cpu_s - was).max(0.0) / seconds.max(1e-6) * 100.0;
            (p.comm.clone(), p.pid, pct)
        })
        .filter(|p| p.2 >= 1.0)
        .collect();
    used.sort_by(|a, b| b.2.total_cmp(&a.2));
    used.truncate(BUSIEST);
    used
}

impl Quiet {
    /// The window ends now: its CPU counters at the end, and who used the
    /// CPU in it. The run is NOISY if others used more than the threshold
    /// in any window.
    pub(crate) fn close(&mut self, window: Window, server: &Server) -> (Usage, Load) {
        let end = server.usage();
        let load = Load::between(&window.start, &end);
        let seconds = window.start.at.elapsed().as_secs_f64();
        let busiest = busiest(&window.others, &window.ours.others(), seconds);
        self.note_window(&load, busiest);
        (end, load)
    }

    /// Keeps the noisiest window's share of the others and who they were
    /// (windows long enough to judge).
    fn note_window(&mut self, load: &Load, busiest: Vec<(String, u32, f64)>) {
        if load.seconds < SAMPLE.as_secs_f64() {
            self.short_windows += 1;
            return;
        }
        if self
            .window_others_pct
            .is_none_or(|pct| load.others_pct >= pct)
        {
            self.window_others_pct = Some(load.others_pct);
            self.window_busiest = busiest;
        }
    }

    fn before_noisy(&self) -> bool {
        self.before.others_pct > self.threshold_pct
    }

    fn window_noisy(&self) -> bool {
        self.window_others_pct
            .is_some_and(|pct| pct > self.threshold_pct)
    }

    /// Others used more than the threshold before or during the measured
    /// phase: the figures may measure them.
    pub(crate) fn noisy(&self) -> bool {
        self.before_noisy() || self.window_noisy()
    }

    /// ` [NOISY]` for the table's first line, or nothing.
    pub(crate) fn mark(&self) -> &'static str {
        if self.noisy() {
            " [NOISY]"
        } else {
            ""
        }
    }

    fn busiest_line(&self) -> String {
        busiest_line(&self.busiest)
    }

    /// The table's rows for a measured window: who used the machine in it
    /// (`what`: the row's name), and the quiet check.
    pub(crate) fn rows(&self, t: &mut String, what: &str, load: &Load) {
        row(t, what, load.line());
        self.row(t);
    }

    /// The table's last line, PASS or FAIL (`pass`, `fail`), and a NOISY
    /// line under it when the run was noisy.
    pub(crate) fn verdict(&self, t: &mut String, passed: bool, pass: &str, fail: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(t, "\n{}", if passed { pass } else { fail });
        if self.noisy() {
            let _ = writeln!(
                t,
                "NOISY: other processes used more than --quiet-max-busy {:.0}% of one core \
                 (see quiet check)",
                self.threshold_pct
            );
        }
    }

    /// The table's `quiet check` row.
    pub(crate) fn row(&self, t: &mut String) {
        let verdict = match (self.before_noisy(), self.window_noisy()) {
            (false, false) => "quiet".to_owned(),
            (true, _) => "NOISY before the window (--allow-noisy)".to_owned(),
            (false, true) => "NOISY: others went over the threshold in the window".to_owned(),
        };
        row(
            t,
            "quiet check",
            format!(
                "others {:.0}% of one core over {:.1} s before, {} in the window{} \
                 (threshold {:.0}%, --quiet-max-busy): {verdict}; busiest before: {}; \
                 in the window: {}",
                self.before.others_pct,
                self.before.seconds,
                self.window_others_pct
                    .map_or("-".into(), |pct| format!("{pct:.0}%")),
                match self.short_windows {
                    0 => String::new(),
                    n => format!(" ({n} window(s) under {} s not judged)", SAMPLE.as_secs()),
                },
                self.threshold_pct,
                self.busiest_line(),
                busiest_line(&self.window_busiest)
            ),
        );
    }

    /// A report's JSON object with `quiet_check` ([`Self::json`]) and
    /// `noisy` added.
    pub(crate) fn stamp(&self, mut report: serde_json::Value) -> serde_json::Value {
        if let Some(object) = report.as_object_mut() {
            object.insert("quiet_check".into(), self.json());
            object.insert("noisy".into(), self.noisy().into());
        }
        report
    }

    /// The JSON's `quiet_check` object.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "others_busy_pct": self.before.others_pct,
            "threshold_pct": self.threshold_pct,
            "window_others_busy_pct": self.window_others_pct,
            "short_windows_not_judged": self.short_windows,
            "before": self.before,
            "busiest": busiest_json(&self.busiest),
            "window_busiest": busiest_json(&self.window_busiest),
        })
    }
}

/// `rustc (pid 4242) 95%, cc1 (pid 4250) 12%`, or `none over 1%`.
fn busiest_line(busiest: &[(String, u32, f64)]) -> String {
    if busiest.is_empty() {
        return "none over 1%".into();
    }
    busiest
        .iter()
        .map(|(name, pid, pct)| format!("{name} (pid {pid}) {pct:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn busiest_json(busiest: &[(String, u32, f64)]) -> serde_json::Value {
    busiest
        .iter()
        .map(|(name, pid, pct)| serde_json::json!({"name": name, "pid": pid, "pct": pct}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, comm: &str, cpu_s: f64) -> ProcCpu {
        ProcCpu {
            pid,
            ppid: 1,
            comm: comm.into(),
            cpu_s,
        }
    }

    #[test]
    fn busiest_others_first_idle_ones_left_out() {
        let before = [p(10, "rustc", 5.0), p(11, "cc1", 1.0), p(12, "sshd", 2.0)];
        let after = [
            p(10, "rustc", 5.9),
            p(11, "cc1", 1.2),
            p(12, "sshd", 2.0),
            p(13, "ld", 0.05),
        ];
        let b = busiest(&before, &after, 1.0);
        let names: Vec<_> = b.iter().map(|x| (x.0.as_str(), x.1)).collect();
        assert_eq!(names, [("rustc", 10), ("cc1", 11), ("ld", 13)]);
        assert!((b[0].2 - 90.0).abs() < 1e-6);
    }

    #[test]
    fn noisy_before_or_in_the_window() {
        let load = |others_pct: f64| {
            let mut l = Load::between(
                &crate::procfs::Usage::sample(None, None),
                &crate::procfs::Usage::sample(None, None),
            );
            l.others_pct = others_pct;
            l.seconds = 2.0;
            l
        };
        let mut q = Quiet {
            before: load(4.0),
            threshold_pct: 10.0,
            busiest: Vec::new(),
            window_others_pct: None,
            window_busiest: Vec::new(),
            short_windows: 0,
        };
        assert!(!q.noisy());
        assert_eq!(q.mark(), "");
        let rustc = || vec![("rustc".to_owned(), 7, 8.0)];
        q.note_window(&load(8.0), rustc());
        q.note_window(&load(3.0), Vec::new());
        assert_eq!(q.window_others_pct, Some(8.0));
        assert_eq!(q.window_busiest, rustc());
        assert_eq!(busiest_line(&q.window_busiest), "rustc (pid 7) 8%");
        assert_eq!(busiest_line(&[]), "none over 1%");
        assert!(!q.noisy());
        // Too short to judge: 40 ms is four ticks.
        let mut short = load(90.0);
        short.seconds = 0.04;
        q.note_window(&short, Vec::new());
        assert_eq!(q.short_windows, 1);
        assert!(!q.noisy());
        q.note_window(&load(12.0), Vec::new());
        assert!(q.noisy() && !q.before_noisy());
        assert_eq!(q.mark(), " [NOISY]");
        q.before = load(11.0);
        assert!(q.before_noisy());
        assert_eq!(q.json()["others_busy_pct"], 11.0);
        let stamped = q.stamp(serde_json::json!({"passed": true}));
        assert_eq!(stamped["noisy"], true);
        assert_eq!(stamped["quiet_check"]["threshold_pct"], 10.0);
    }
}
