//! Files shipped in configs/ for the container engines.

use std::process::Command;

fn configs() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

/// The AppArmor profile compiles (without a kernel: -Q skips the load).
/// A broken copy must be rejected, so the check itself is known to work.
#[test]
fn apparmor_profile_parses() {
    let profile = configs().join("apparmor/aibox-default");
    let parse = |p: &std::path::Path| {
        let sbin = std::path::Path::new("/usr/sbin/apparmor_parser");
        Command::new(if sbin.exists() {
            sbin
        } else {
            std::path::Path::new("apparmor_parser")
        })
        .args(["-Q", "-K", "-T"])
        .arg(p)
        .output()
        .expect("apparmor_parser is needed for this test (apt-get install apparmor)")
    };
    let o = parse(&profile);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    let text = std::fs::read_to_string(&profile).unwrap();
    std::fs::write(&broken, text.replace("deny mount,", "deny mount")).unwrap();
    assert!(
        !parse(&broken).status.success(),
        "a broken profile was accepted"
    );
}

/// configs/seccomp.json is valid JSON in the OCI runtime-spec shape (its
/// content is checked against the policy by aibox-sandbox's unit tests).
#[test]
fn seccomp_profile_is_oci_json() {
    let text = std::fs::read_to_string(configs().join("seccomp.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["defaultAction"], "SCMP_ACT_ERRNO");
    assert!(v["syscalls"].as_array().unwrap().len() > 10);
}
