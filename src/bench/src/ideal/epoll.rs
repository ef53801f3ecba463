//! The three epoll calls the ideal broadcaster's writer threads wait in,
//! declared by hand: std has no readiness API, and a dependency (libc,
//! mio) for three declarations would change the workspace's lock file for
//! a yardstick. Linux only, like the rest of the bench (/proc).
//!
//! Safe to use: [`Epoll`] owns its descriptor, and every call passes
//! pointers to memory that lives across it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Readable.
pub(super) const IN: u32 = 0x001;
/// Writable.
pub(super) const OUT: u32 = 0x004;
pub(super) const ERR: u32 = 0x008;
pub(super) const HUP: u32 = 0x010;
/// The peer shut its side down.
pub(super) const RDHUP: u32 = 0x2000;
/// Edge-triggered: reported when the readiness changes, so a socket with
/// nothing pending costs no wake-up however often it could be written.
pub(super) const EDGE: u32 = 1 << 31;

const EPOLL_CLOEXEC: i32 = 0o2_000_000;
const EPOLL_CTL_ADD: i32 = 1;

/// `struct epoll_event`: packed on x86_64 (as the kernel's is), natural
/// alignment elsewhere.
#[repr(C)]
#[cfg_attr(target_arch = "x86_64", repr(packed))]
#[derive(Clone, Copy, Default)]
pub(super) struct Event {
    events: u32,
    token: u64,
}

impl Event {
    /// What the descriptor is ready for ([`IN`], [`OUT`], ...).
    pub(super) fn readiness(&self) -> u32 {
        self.events
    }

    /// The token it was added with.
    pub(super) fn token(&self) -> u64 {
        self.token
    }
}

extern "C" {
    fn epoll_create1(flags: i32) -> i32;
    fn epoll_ctl(epfd: i32, op: i32, fd: i32, event: *mut Event) -> i32;
    fn epoll_wait(epfd: i32, events: *mut Event, maxevents: i32, timeout: i32) -> i32;
}

pub(super) struct Epoll(OwnedFd);

impl Epoll {
    pub(super) fn new() -> io::Result<Epoll> {
        // SAFETY: no pointer; the result is checked before it is owned.
        let fd = unsafe { epoll_create1(EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for `interest`, reported with `token`. A descriptor
    /// leaves the set when it is closed.
    pub(super) fn add(&self, fd: RawFd, interest: u32, token: u64) -> io::Result<()> {
        let mut event = Event {
            events: interest,
            token,
        };
        // SAFETY: `event` lives across the call, which only reads it.
        let done = unsafe { epoll_ctl(self.0.as_raw_fd(), EPOLL_CTL_ADD, fd, &mut event) };
        if done < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits (no limit) until a descriptor is ready: how many of `events`
    /// were filled (0 after a signal).
    pub(super) fn wait(&self, events: &mut [Event]) -> io::Result<usize> {
        let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
        // SAFETY: the kernel writes at most `max` events into `events`.
        let n = unsafe { epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), max, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        Ok(n as usize)
    }
}
