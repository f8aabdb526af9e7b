//! Wakes a waiter as soon as anything changes in the directory of a watched file (inotify):
//! the file written in place (on its close, so a half-written file is not read), replaced by
//! a rename (as editors and atomic writers do), or a ConfigMap volume swapping its `..data`
//! symlink. The waiter then decides from the file itself whether it changed, so a watch that
//! misses an event only costs the timeout it waits anyway.

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DirWatchError {
    #[error("cannot watch {dir} for changes: {source}")]
    Watch { dir: PathBuf, source: nix::Error },
    #[error("waiting for changes in {dir}: {source}")]
    Wait { dir: PathBuf, source: nix::Error },
}

/// An inotify watch on one file's directory.
pub struct DirWatch {
    inotify: Inotify,
    dir: PathBuf,
}

impl DirWatch {
    /// Watches the directory that holds `file` (which need not exist yet).
    pub fn new(file: &Path) -> Result<DirWatch, DirWatchError> {
        let dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let err = |source| DirWatchError::Watch {
            dir: dir.clone(),
            source,
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(err)?;
        let events = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB;
        inotify.add_watch(&dir, events).map_err(err)?;
        Ok(DirWatch { inotify, dir })
    }

    /// Waits at most `timeout` for a change in the directory: true if one came (all pending
    /// events are consumed), false on timeout.
    pub fn wait(&self, timeout: Duration) -> Result<bool, DirWatchError> {
        let err = |source| DirWatchError::Wait {
            dir: self.dir.clone(),
            source,
        };
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) | Err(nix::Error::EINTR) => return Ok(false),
            Ok(_) => {}
            Err(e) => return Err(err(e)),
        }
        let mut any = false;
        loop {
            match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => any = true,
                Ok(_) | Err(nix::Error::EAGAIN) => return Ok(any),
                Err(e) => return Err(err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("podwire-dirwatch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn test_a_rename_into_the_directory_wakes_the_waiter_at_once() {
        let dir = scratch("rename");
        let file = dir.join("services.json");
        let watch = DirWatch::new(&file).unwrap();
        assert!(!watch.wait(Duration::from_millis(10)).unwrap());
        let writer = std::thread::spawn({
            let (tmp, file) = (dir.join(".services.tmp"), file.clone());
            move || {
                std::thread::sleep(Duration::from_millis(50));
                std::fs::write(&tmp, b"{}").unwrap();
                std::fs::rename(&tmp, &file).unwrap();
            }
        });
        let t = Instant::now();
        assert!(watch.wait(Duration::from_secs(5)).unwrap());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        writer.join().unwrap();
        // Drained: the next wait sees nothing new.
        std::thread::sleep(Duration::from_millis(20));
        while watch.wait(Duration::from_millis(1)).unwrap() {}
        assert!(!watch.wait(Duration::from_millis(10)).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_a_missing_directory_is_an_error_naming_it() {
        let e = DirWatch::new(Path::new("/nonexistent-podwire/services.json"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent-podwire"), "{e}");
    }
}
