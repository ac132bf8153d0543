//! Configuration parsing and checking.

use super::*;
use crate::storage::keys::is_system_key;

fn with_dir(mut c: Config, dir: &Path) -> Config {
    c.node.data_dir = dir.to_path_buf();
    c
}

#[test]
fn embedded_default_matches_code_defaults() {
    assert_eq!(Config::embedded_default(), Config::default());
}

#[test]
fn example_cluster_configs_validate() {
    let tmp = tempfile::tempdir().unwrap();
    for i in 1..=3 {
        let path = format!(
            "{}/config/cluster-3/node{i}.toml",
            env!("CARGO_MANIFEST_DIR")
        );
        let c = Config::from_file(Path::new(&path)).unwrap();
        let c = with_dir(c, &tmp.path().join(format!("n{i}")));
        c.validate().unwrap();
        assert_eq!(c.members().unwrap().len(), 3);
    }
}

fn err_field(c: &Config) -> &'static str {
    match c.validate() {
        Err(ConfigError::Invalid { field, .. }) => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn bad_configs_name_their_field() {
    let tmp = tempfile::tempdir().unwrap();
    let base = with_dir(Config::default(), tmp.path());
    base.validate().unwrap();

    let mut c = base.clone();
    c.node.listen_addr = "localhost-ish".into();
    assert_eq!(err_field(&c), "node.listen_addr");

    let mut c = base.clone();
    c.cluster.initial_cluster = vec!["1@127.0.0.1:20160".into(), "1@127.0.0.1:20161".into()];
    assert_eq!(err_field(&c), "cluster.initial_cluster");

    let mut c = base.clone();
    c.cluster.initial_cluster = vec!["2@127.0.0.1:20160".into()];
    assert_eq!(err_field(&c), "node.id");

    let mut c = base.clone();
    c.cluster.initial_cluster = vec!["1@127.0.0.1:9".into()];
    assert_eq!(err_field(&c), "node.advertise_addr");

    let mut c = base.clone();
    c.cluster.initial_cluster = vec!["x@127.0.0.1:20160".into()];
    assert_eq!(err_field(&c), "cluster.initial_cluster");

    let mut c = base.clone();
    c.raft.election_ticks = 2;
    assert_eq!(err_field(&c), "raft.election_ticks");

    let mut c = base.clone();
    c.cluster.split_keys = vec!["b".into(), "a".into()];
    assert_eq!(err_field(&c), "cluster.split_keys");

    let mut c = base.clone();
    c.server.grpc_threads = 100_000;
    assert_eq!(err_field(&c), "server.grpc_threads");

    let mut c = base.clone();
    c.storage.data_memtable_mb = 0;
    assert_eq!(err_field(&c), "storage.data_memtable_mb");

    let mut c = base.clone();
    c.node.data_dir = PathBuf::new();
    assert_eq!(err_field(&c), "node.data_dir");

    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let c = with_dir(base.clone(), &file);
    assert_eq!(err_field(&c), "node.data_dir");
}

#[test]
fn checking_touches_no_disk_and_start_up_prepares_the_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("not-yet").join("data");
    let c = with_dir(Config::default(), &dir);
    c.validate().unwrap();
    assert!(!dir.exists(), "validate created the data directory");
    c.prepare_data_dir().unwrap();
    assert!(dir.is_dir());
}

#[test]
fn unknown_fields_and_bad_types_are_parse_errors() {
    let e = Config::from_toml_str("[node]\nidd = 3\n", "t").unwrap_err();
    assert!(e.to_string().contains("idd"), "{e}");
    let e = Config::from_toml_str("[raft]\nworkers = \"two\"\n", "t").unwrap_err();
    assert!(e.to_string().contains("workers"), "{e}");
    let e = Config::from_toml_str("\u{0}garbage[[[", "t").unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }));
}

#[test]
fn grpc_threads_leave_the_raft_workers_their_cores() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut c = Config::default();
    c.raft.workers = 1;
    assert_eq!(c.grpc_threads(), (cores - 1).max(1));
    c.raft.workers = 64;
    assert_eq!(c.grpc_threads(), 1, "never fewer than one by default");
    c.server.grpc_threads = 3;
    assert_eq!(c.grpc_threads(), 3, "an explicit count wins");
}

#[test]
fn even_split_keys_are_increasing() {
    let mut c = Config::default();
    for n in [1u32, 2, 3, 64, 1000, 65280] {
        c.cluster.initial_regions = n;
        let keys = c.initial_split_keys();
        assert_eq!(keys.len() as u32, n - 1);
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert!(keys.iter().all(|k| !k.is_empty() && !is_system_key(k)));
    }
}

#[test]
fn auto_compaction_modes_parse_and_bad_ones_are_refused() {
    use crate::config::{AutoCompaction, MvccConfig};
    use std::time::Duration;
    let parse = |s: &str| {
        MvccConfig {
            auto_compaction: s.into(),
            ..Default::default()
        }
        .auto_compaction()
    };
    assert_eq!(parse("").unwrap(), None);
    assert_eq!(parse("off").unwrap(), None);
    assert_eq!(
        parse("periodic:1h").unwrap(),
        Some(AutoCompaction::Periodic(Duration::from_secs(3600)))
    );
    assert_eq!(
        parse("periodic:90s").unwrap(),
        Some(AutoCompaction::Periodic(Duration::from_secs(90)))
    );
    assert_eq!(
        parse("revisions:100000").unwrap(),
        Some(AutoCompaction::Revisions(100_000))
    );
    for bad in [
        "periodic:1",
        "periodic:0h",
        "periodic:h",
        "revisions:",
        "revisions:-1",
        "weekly:1",
        "1h",
    ] {
        let err = parse(bad).expect_err(bad).to_string();
        assert!(err.contains("mvcc.auto_compaction"), "{bad}: {err}");
    }
}
