//! `tessera auth`, `tessera user`, `tessera role`: turning authentication on and off, and
//! the cluster's users, roles and key-range permissions (docs/security.md, "Users and
//! roles"). Changes need the root role (`--user root`) once authentication is on, and a
//! certificate of the cluster CA (`--cert`) before.
//!
//! Invariants:
//! - a password given as `NAME:PASSWORD` or read from standard input (its first line)
//!   never appears in output;
//! - every command makes one change through any node, or fails with the server's reason.

use std::io::BufRead;

use serde::Serialize;
use tessera::proto::auth_change_request::Op;
use tessera::proto::{self, KeyPermission, PermissionKind, RolePermission, UserPassword, UserRole};

use super::{print_json, text, ConnArgs, Error, Result};

#[derive(clap::Subcommand)]
pub enum AuthOp {
    /// Turn authentication on: every call then needs a user (`--user`) or a certificate of
    /// the cluster CA. Needs user root with role root, and TLS.
    Enable,
    /// Turn authentication off.
    Disable,
    /// Whether authentication is on.
    Status,
}

#[derive(clap::Subcommand)]
pub enum UserOp {
    /// Add user NAME; the password after a colon (`NAME:PASSWORD`) or on standard input.
    Add { name: String },
    /// Delete a user: its tokens stop working at once.
    Delete { name: String },
    /// Change a user's password (`NAME:PASSWORD`, or on standard input): its tokens stop
    /// working at once.
    Passwd { name: String },
    /// Give user NAME role ROLE.
    GrantRole { name: String, role: String },
    /// Take role ROLE from user NAME.
    RevokeRole { name: String, role: String },
    /// List the users and their roles.
    List,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    Read,
    Write,
    Readwrite,
}

#[derive(clap::Args)]
pub struct Range {
    /// The key (with --prefix: every key starting with it; "" with --from-key: every key).
    key: String,
    /// The end of the range [KEY, RANGE_END); without it, KEY alone.
    range_end: Option<String>,
    /// Every key starting with KEY.
    #[arg(long, conflicts_with = "range_end")]
    prefix: bool,
    /// Every key from KEY on.
    #[arg(long = "from-key", conflicts_with_all = ["range_end", "prefix"])]
    from_key: bool,
}

impl Range {
    fn end(&self) -> Vec<u8> {
        if self.prefix {
            tessera_api::keys::prefix_end(self.key.as_bytes())
        } else if self.from_key {
            vec![0]
        } else {
            self.range_end.clone().unwrap_or_default().into_bytes()
        }
    }
}

#[derive(clap::Subcommand)]
pub enum RoleOp {
    /// Add a role (with no permissions).
    Add { name: String },
    /// Delete a role; its users lose it.
    Delete { name: String },
    /// Let role ROLE read, write or both on a key or range.
    GrantPermission {
        role: String,
        #[arg(value_enum)]
        kind: Kind,
        #[command(flatten)]
        range: Range,
    },
    /// Take back the permission of ROLE on exactly this key or range.
    RevokePermission {
        role: String,
        #[command(flatten)]
        range: Range,
    },
    /// List the roles and their permissions.
    List,
}

/// `NAME:PASSWORD`, or NAME and the first line of standard input.
fn name_and_password(arg: &str) -> Result<(String, String)> {
    if let Some((name, password)) = arg.split_once(':') {
        return Ok((name.to_string(), password.to_string()));
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|source| Error::Io {
            what: "reading the password from standard input".into(),
            source,
        })?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        return Err(Error::Usage(format!(
            "give the password as {arg}:PASSWORD or on standard input"
        )));
    }
    Ok((arg.to_string(), password))
}

pub async fn auth(conn: ConnArgs, op: AuthOp) -> Result<()> {
    let client = conn.connect(false).await?;
    match op {
        AuthOp::Enable => client.auth_change(Op::Enable(true)).await?,
        AuthOp::Disable => client.auth_change(Op::Enable(false)).await?,
        AuthOp::Status => {
            let st = client.auth_show().await?;
            if conn.json {
                print_json(&serde_json::json!({ "enabled": st.enabled }));
            } else {
                println!("authentication {}", if st.enabled { "on" } else { "off" });
            }
            return Ok(());
        }
    }
    if !conn.json {
        println!("done");
    }
    Ok(())
}

#[derive(Serialize)]
struct UserJson<'a> {
    name: &'a str,
    roles: &'a [String],
}

pub async fn user(conn: ConnArgs, op: UserOp) -> Result<()> {
    let change = match op {
        UserOp::Add { name } => {
            let (name, password) = name_and_password(&name)?;
            Op::UserAdd(UserPassword { name, password })
        }
        UserOp::Delete { name } => Op::UserDelete(name),
        UserOp::Passwd { name } => {
            let (name, password) = name_and_password(&name)?;
            Op::UserPassword(UserPassword { name, password })
        }
        UserOp::GrantRole { name, role } => Op::UserGrantRole(UserRole { user: name, role }),
        UserOp::RevokeRole { name, role } => Op::UserRevokeRole(UserRole { user: name, role }),
        UserOp::List => {
            let st = conn.connect(false).await?.auth_show().await?;
            if conn.json {
                let users: Vec<UserJson> = st
                    .users
                    .iter()
                    .map(|u| UserJson {
                        name: &u.name,
                        roles: &u.roles,
                    })
                    .collect();
                print_json(&users);
            }
            for u in st.users.iter().filter(|_| !conn.json) {
                println!("{}\t{}", u.name, u.roles.join(","));
            }
            return Ok(());
        }
    };
    conn.connect(false).await?.auth_change(change).await?;
    if !conn.json {
        println!("done");
    }
    Ok(())
}

#[derive(Serialize)]
struct PermissionJson {
    kind: &'static str,
    key: String,
    range_end: String,
}

fn kind_name(k: i32) -> &'static str {
    match PermissionKind::try_from(k) {
        Ok(PermissionKind::PermissionRead) => "read",
        Ok(PermissionKind::PermissionWrite) => "write",
        Ok(PermissionKind::PermissionReadwrite) => "readwrite",
        Err(_) => "unknown",
    }
}

fn permission_json(p: &proto::KeyPermission) -> PermissionJson {
    PermissionJson {
        kind: kind_name(p.kind),
        key: text(&p.key),
        range_end: text(&p.range_end),
    }
}

pub async fn role(conn: ConnArgs, op: RoleOp) -> Result<()> {
    let permission = |role: String, kind: PermissionKind, range: &Range| RolePermission {
        role,
        permission: Some(KeyPermission {
            kind: kind as i32,
            key: range.key.clone().into_bytes(),
            range_end: range.end(),
        }),
    };
    let change = match op {
        RoleOp::Add { name } => Op::RoleAdd(name),
        RoleOp::Delete { name } => Op::RoleDelete(name),
        RoleOp::GrantPermission { role, kind, range } => {
            let kind = match kind {
                Kind::Read => PermissionKind::PermissionRead,
                Kind::Write => PermissionKind::PermissionWrite,
                Kind::Readwrite => PermissionKind::PermissionReadwrite,
            };
            Op::RoleGrantPermission(permission(role, kind, &range))
        }
        RoleOp::RevokePermission { role, range } => {
            Op::RoleRevokePermission(permission(role, PermissionKind::PermissionRead, &range))
        }
        RoleOp::List => {
            let st = conn.connect(false).await?.auth_show().await?;
            if conn.json {
                let roles: Vec<serde_json::Value> = st
                    .roles
                    .iter()
                    .map(|r| {
                        let perms: Vec<PermissionJson> =
                            r.permissions.iter().map(permission_json).collect();
                        serde_json::json!({ "name": r.name, "permissions": perms })
                    })
                    .collect();
                print_json(&roles);
                return Ok(());
            }
            for r in &st.roles {
                println!("{}", r.name);
                for p in &r.permissions {
                    let end = match p.range_end.as_slice() {
                        [] => String::new(),
                        [0] => " (and every key after)".into(),
                        e => format!(" to {:?}", text(e)),
                    };
                    println!("\t{} {:?}{end}", kind_name(p.kind), text(&p.key));
                }
            }
            return Ok(());
        }
    };
    conn.connect(false).await?.auth_change(change).await?;
    if !conn.json {
        println!("done");
    }
    Ok(())
}
