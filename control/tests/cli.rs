//! The `podwire` binary's command line, run as a user would (no root, nothing set up).
#![allow(clippy::tests_outside_test_module)]

use std::process::Command;

fn podwire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_podwire"))
}

#[test]
fn test_help_does_not_show_the_etcd_password_from_the_environment() {
    let out = podwire()
        .args(["run", "--help"])
        .env("FLANNELD_ETCD_PASSWORD", "hunter2-from-env")
        .env("FLANNELD_ETCD_USERNAME", "flannel-user-from-env")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    assert!(help.contains("FLANNELD_ETCD_PASSWORD"), "{help}");
    assert!(help.contains("--etcd-password-file"), "{help}");
    assert!(
        !help.contains("hunter2-from-env"),
        "--help shows the password: {help}"
    );
    assert!(!help.contains("flannel-user-from-env"), "{help}");
}

#[test]
fn test_an_unreadable_password_file_is_a_clear_error() {
    let missing = std::env::temp_dir().join(format!("podwire-no-such-pw-{}", std::process::id()));
    let out = podwire()
        .args(["run", "--etcd-password-file"])
        .arg(&missing)
        .env_remove("FLANNELD_ETCD_PASSWORD")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("No such file"),
        "{err}"
    );
    let both = podwire()
        .args(["run", "--etcd-password", "x", "--etcd-password-file", "/p"])
        .output()
        .unwrap();
    assert!(!both.status.success());
    assert!(
        String::from_utf8_lossy(&both.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&both.stderr)
    );
}
