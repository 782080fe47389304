use super::*;

fn load_user(text: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    load_texts(None, Some((Path::new("/u/config.yaml"), text)), &env)
}

#[test]
fn defaults_load_and_runtime_is_native() {
    let l = load_user("", &[]).unwrap();
    assert_eq!(l.config.runtime, Runtime::Native);
    assert_eq!(l.origins["runtime"], Origin::Default);
    assert_eq!(l.config.resources.cpus, 4);
}

#[test]
fn file_then_env_layering_with_origins() {
    let l = load_user(
        "resources:\n  cpus: 2\n  memory: 1g\n",
        &[
            ("AIBOX_RESOURCES_CPUS", "3"),
            ("AIBOX_NETWORK_ALLOWED_DOMAINS", "a.com, b.com"),
        ],
    )
    .unwrap();
    assert_eq!(l.config.resources.cpus, 3);
    assert_eq!(
        l.origins["resources.cpus"],
        Origin::Env("AIBOX_RESOURCES_CPUS".into())
    );
    assert_eq!(l.config.resources.memory, "1g");
    assert_eq!(
        l.origins["resources.memory"],
        Origin::File("/u/config.yaml".into())
    );
    assert_eq!(l.config.network.allowed_domains, vec!["a.com", "b.com"]);
}

#[test]
fn system_file_is_below_user_file() {
    let l = load_texts(
        Some((
            Path::new("/etc/aibox/config.yaml"),
            "shell: zsh\nimage: sys\n",
        )),
        Some((Path::new("/u/config.yaml"), "image: mine\n")),
        &[],
    )
    .unwrap();
    assert_eq!(l.config.shell, Shell::Zsh);
    assert_eq!(l.config.image, "mine");
}

#[test]
fn unknown_key_names_file_line_key_and_allowed() {
    let e = load_user("runtime: native\nresources:\n  cpu: 2\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("/u/config.yaml line 3"), "{e}");
    assert!(e.contains("`resources.cpu`"), "{e}");
    assert!(e.contains("cpus, memory, nofile, pids, tmp_size"), "{e}");
}

#[test]
fn bad_enum_names_value_and_allowed_values() {
    let e = load_user("runtime: lxc\n", &[]).unwrap_err().to_string();
    assert!(e.contains("/u/config.yaml"), "{e}");
    assert!(e.contains("`runtime`"), "{e}");
    assert!(e.contains("lxc"), "{e}");
    assert!(
        e.contains("native") && e.contains("podman") && e.contains("docker"),
        "{e}"
    );
}

#[test]
fn wrong_type_is_an_error() {
    let e = load_user("resources:\n  cpus: many\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`resources.cpus`") && e.contains("many"), "{e}");
    assert!(e.starts_with("/u/config.yaml line 2:"), "{e}");
    let e = load_user("", &[("AIBOX_GVISOR_ENABLED", "perhaps")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("AIBOX_GVISOR_ENABLED") && e.contains("gvisor.enabled"),
        "{e}"
    );
}

#[test]
fn malformed_yaml_is_an_error() {
    let e = load_user("resources: [\n  cpus: 2\n", &[]).unwrap_err();
    assert!(matches!(e, ConfigError::Yaml { .. }), "{e}");
}

#[test]
fn unknown_env_override_is_an_error() {
    let e = load_user("", &[("AIBOX_RESOURCES_CPUSS", "2")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("AIBOX_RESOURCES_CPUSS"), "{e}");
    // Variables that are not section overrides are not ours to judge.
    load_user("", &[("AIBOX_CONFIG", "/x"), ("AIBOX_SANDBOX", "x")]).unwrap();
}

#[test]
fn semantic_checks() {
    assert!(load_user("resources:\n  memory: lots\n", &[]).is_err());
    assert!(load_user("resources:\n  cpus: 0\n", &[]).is_err());
    assert!(load_user("paths:\n  data_dir: relative/dir\n", &[]).is_err());
    assert!(load_user("network:\n  proxy_port: 70000\n", &[]).is_err());
    // Decision-log bounds; the original's keys aibox does not honour are
    // refused, not ignored.
    for bad in [
        "policy:\n  decision_log_max_size: 16k\n",
        "policy:\n  decision_log_keep: 0\n",
        "policy:\n  decision_log_keep: 4000000000\n",
        "policy:\n  decision_log_path: /tmp/d.jsonl\n",
        "policy:\n  hot_reload_secs: 30\n",
    ] {
        let e = load_user(bad, &[]).unwrap_err().to_string();
        assert!(e.contains("policy."), "{bad}: {e}");
    }
    let ok = load_user(
        "policy:\n  decision_log_max_size: 64k\n  decision_log_keep: 1\n  audit_decisions_per_sec: 0\n",
        &[],
    )
    .unwrap();
    assert_eq!(ok.config.policy.decision_log_keep, 1);
    assert_eq!(parse_size("2Gi"), Some(2 << 30));
    assert_eq!(parse_size("512m"), Some(512 << 20));
    assert_eq!(parse_size("x"), None);
}

#[test]
fn env_names_are_unique() {
    let leaves = default_leaves();
    let names: BTreeSet<String> = leaves.keys().map(|k| env_name(k)).collect();
    assert_eq!(names.len(), leaves.len());
}

#[test]
fn templates_are_valid() {
    for (name, text) in TEMPLATES {
        load_user(text, &[]).unwrap_or_else(|e| panic!("template {name}: {e}"));
    }
}

#[test]
fn set_validates_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let sources = Sources {
        system_file: dir.path().join("none.yaml"),
        user_file: dir.path().join("c/config.yaml"),
        user_file_explicit: false,
        env: vec![],
    };
    set(&sources, "resources.cpus", "2").unwrap();
    set(&sources, "network.allowed_domains", "a.com,b.com").unwrap();
    let l = load(&sources).unwrap();
    assert_eq!(l.config.resources.cpus, 2);
    assert_eq!(get(&l, "network.allowed_domains").unwrap(), "a.com,b.com");
    let before = std::fs::read_to_string(&sources.user_file).unwrap();
    assert!(set(&sources, "runtime", "lxc").is_err());
    assert!(set(&sources, "nope.key", "1").is_err());
    assert_eq!(before, std::fs::read_to_string(&sources.user_file).unwrap());
}
