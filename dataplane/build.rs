//! Builds the XDP program (`ebpf/podwire_xdp.c`) with Debian's clang into OUT_DIR; the
//! dataplane embeds the object (`port::xdp`). Needs `clang` and `libbpf-dev` (bpf_helpers.h).
//! Only with the `xdp` feature (on by default): without it nothing is built and clang is not
//! needed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    if std::env::var_os("CARGO_FEATURE_XDP").is_none() {
        return;
    }
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ebpf/podwire_xdp.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("podwire_xdp.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=CLANG");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        // <asm/types.h> lives in the multiarch directory, which -target bpf does not search.
        .arg(format!(
            "-I/usr/include/{}-linux-gnu",
            std::env::consts::ARCH
        ))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "{clang} could not build {} ({s}); it needs libbpf-dev (bpf/bpf_helpers.h)",
            src.display()
        ),
        Err(e) => panic!(
            "cannot run {clang} ({e}): the XDP program needs clang (Debian: apt-get install clang libbpf-dev)"
        ),
    }
}
