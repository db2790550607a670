//! Helpers shared by the crash tests: a child process running one test of this same test binary,
//! whose stdout lines reach the parent through a channel while the parent decides when to kill it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;

/// A child running this test binary's test `test` alone, with `envs` set.
pub struct ChildTest {
    pub child: Child,
    /// Each line the child prints on stdout.
    pub lines: mpsc::Receiver<String>,
    reader: JoinHandle<()>,
}

impl ChildTest {
    pub fn spawn(test: &str, envs: &[(&str, &std::ffi::OsStr)]) -> ChildTest {
        let exe = std::env::current_exe().expect("path of the test binary");
        let mut command = Command::new(exe);
        command.args(["--exact", test, "--nocapture", "--test-threads=1"]);
        for (name, value) in envs {
            command.env(name, value);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout is piped");
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildTest {
            child,
            lines,
            reader,
        }
    }

    /// SIGKILLs the child (no destructors, no flush: like a crash) unless it already exited;
    /// returns whether it had exited on its own, and its status.
    pub fn kill(mut self) -> (bool, std::process::ExitStatus, mpsc::Receiver<String>) {
        let exited_early = self.child.try_wait().expect("poll child").is_some();
        let _ = self.child.kill();
        let status = self.child.wait().expect("reap child");
        self.reader.join().expect("stdout reader");
        (exited_early, status, self.lines)
    }
}
