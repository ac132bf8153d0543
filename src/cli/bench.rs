//! `tessera bench`: load-test a cluster (or etcd) and print the report.
//!
//! Invariants:
//! - the text report is printed before the JSON file is written, so a file that cannot be
//!   written (an `Io` error) never loses the report.

use super::{Error, Result};

pub async fn run(args: tessera::bench::BenchArgs) -> Result<()> {
    let json = args.json.clone();
    let report = tessera::bench::run(args).await.map_err(Error::Bench)?;
    println!("{}", report.text());
    if let Some(path) = json {
        std::fs::write(&path, report.json() + "\n").map_err(|source| Error::Io {
            what: format!("cannot write {}", path.display()),
            source,
        })?;
    }
    Ok(())
}
