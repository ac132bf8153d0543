//! The cluster's users, roles and permissions as stored: one record in the placement
//! region (`placement::auth`), changed by compare-and-swap so that concurrent changes never
//! lose one another.
//!
//! Invariants:
//! - names are 1 to 64 characters of `A-Z a-z 0-9 _ . @ -`;
//! - authentication can be on only while user `root` exists and holds role `root`: neither
//!   may then be deleted, nor `root` lose the role, so an enabled cluster always has an
//!   administrator;
//! - `generation` rises with every change; a user's `generation` is the one of its last
//!   password change, so tokens issued before a change or a re-creation do not verify.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::password::PasswordHash;
use crate::proto::{self, auth_change_request::Op};

/// The role that may do everything, administration included.
pub const ROOT: &str = "root";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthDoc {
    pub enabled: bool,
    /// The HMAC key of tokens; made anew every time authentication is enabled.
    pub token_key: Vec<u8>,
    pub generation: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub password: PasswordHash,
    pub roles: BTreeSet<String>,
    pub generation: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Role {
    pub permissions: Vec<Permission>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Read,
    Write,
    ReadWrite,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub kind: Kind,
    pub key: Vec<u8>,
    /// Empty: `key` alone; `[0]`: every key from `key` on (with an empty `key`: every
    /// key); else `[key, range_end)`.
    pub range_end: Vec<u8>,
}

impl Permission {
    pub fn from_proto(p: &proto::KeyPermission) -> Result<Self, String> {
        let kind = match proto::PermissionKind::try_from(p.kind) {
            Ok(proto::PermissionKind::PermissionRead) => Kind::Read,
            Ok(proto::PermissionKind::PermissionWrite) => Kind::Write,
            Ok(proto::PermissionKind::PermissionReadwrite) => Kind::ReadWrite,
            Err(_) => return Err(format!("unknown permission kind {}", p.kind)),
        };
        if p.key.is_empty() && p.range_end != [0] {
            return Err(
                "a permission needs a key (or range_end 0x00 with an empty key: every key)".into(),
            );
        }
        if !p.range_end.is_empty() && p.range_end != [0] && p.range_end <= p.key {
            return Err("a permission's range_end must be above its key".into());
        }
        Ok(Self {
            kind,
            key: p.key.clone(),
            range_end: p.range_end.clone(),
        })
    }

    pub fn to_proto(&self) -> proto::KeyPermission {
        let kind = match self.kind {
            Kind::Read => proto::PermissionKind::PermissionRead,
            Kind::Write => proto::PermissionKind::PermissionWrite,
            Kind::ReadWrite => proto::PermissionKind::PermissionReadwrite,
        };
        proto::KeyPermission {
            kind: kind as i32,
            key: self.key.clone(),
            range_end: self.range_end.clone(),
        }
    }
}

pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 _ . @ -"
        ))
    }
}

/// A change, its password (if any) already hashed: hashing is slow and is done once, not
/// on every retry of the compare-and-swap.
pub enum Change {
    Enable(bool, Vec<u8>),
    UserAdd(String, PasswordHash),
    UserDelete(String),
    UserPassword(String, PasswordHash),
    UserGrantRole(String, String),
    UserRevokeRole(String, String),
    RoleAdd(String),
    RoleDelete(String),
    RoleGrant(String, Permission),
    RoleRevoke(String, Permission),
}

impl Change {
    /// The change `op` asks for; `hash` hashes a password, `token_key` makes a key.
    pub fn from_proto(
        op: Op,
        hash: impl Fn(&str) -> Result<PasswordHash, String>,
        token_key: impl Fn() -> Result<Vec<u8>, String>,
    ) -> Result<Self, String> {
        let user = |n: &str| check_name("user", n).map(|_| n.to_string());
        let role = |n: &str| check_name("role", n).map(|_| n.to_string());
        let perm = |p: &Option<proto::KeyPermission>| {
            Permission::from_proto(p.as_ref().ok_or("the change names no permission")?)
        };
        Ok(match op {
            Op::Enable(true) => Change::Enable(true, token_key()?),
            Op::Enable(false) => Change::Enable(false, Vec::new()),
            Op::UserAdd(u) => Change::UserAdd(user(&u.name)?, new_password(&u.password, &hash)?),
            Op::UserDelete(n) => Change::UserDelete(user(&n)?),
            Op::UserPassword(u) => {
                Change::UserPassword(user(&u.name)?, new_password(&u.password, &hash)?)
            }
            Op::UserGrantRole(r) => Change::UserGrantRole(user(&r.user)?, role(&r.role)?),
            Op::UserRevokeRole(r) => Change::UserRevokeRole(user(&r.user)?, role(&r.role)?),
            Op::RoleAdd(n) => Change::RoleAdd(role(&n)?),
            Op::RoleDelete(n) => Change::RoleDelete(role(&n)?),
            Op::RoleGrantPermission(r) => Change::RoleGrant(role(&r.role)?, perm(&r.permission)?),
            Op::RoleRevokePermission(r) => Change::RoleRevoke(role(&r.role)?, perm(&r.permission)?),
        })
    }
}

fn new_password(
    password: &str,
    hash: &impl Fn(&str) -> Result<PasswordHash, String>,
) -> Result<PasswordHash, String> {
    if password.is_empty() {
        return Err("a password must not be empty".into());
    }
    if password.len() > 1024 {
        return Err("a password may have at most 1024 bytes".into());
    }
    hash(password)
}

impl AuthDoc {
    /// Applies `change`, or says why it cannot be made (nothing changed then).
    pub fn apply(&mut self, change: &Change) -> Result<(), String> {
        let next = self.generation + 1;
        match change {
            Change::Enable(true, key) => {
                let root_ok = self.users.get(ROOT).is_some_and(|u| u.roles.contains(ROOT));
                if !root_ok {
                    return Err(
                        "add user root and grant it role root before enabling authentication"
                            .into(),
                    );
                }
                if !self.enabled {
                    self.enabled = true;
                    self.token_key = key.clone();
                }
            }
            Change::Enable(false, _) => {
                self.enabled = false;
                self.token_key.clear();
            }
            Change::UserAdd(name, password) => {
                if self.users.contains_key(name) {
                    return Err(format!("user {name} already exists"));
                }
                let user = User {
                    password: password.clone(),
                    roles: BTreeSet::new(),
                    generation: next,
                };
                self.users.insert(name.clone(), user);
            }
            Change::UserDelete(name) => {
                if self.enabled && name == ROOT {
                    return Err("user root cannot be deleted while authentication is on".into());
                }
                self.users
                    .remove(name)
                    .ok_or_else(|| format!("no user {name}"))?;
            }
            Change::UserPassword(name, password) => {
                let u = self.user(name)?;
                u.password = password.clone();
                u.generation = next;
            }
            Change::UserGrantRole(name, role) => {
                if role != ROOT && !self.roles.contains_key(role) {
                    return Err(format!("no role {role}"));
                }
                self.user(name)?.roles.insert(role.clone());
            }
            Change::UserRevokeRole(name, role) => {
                if self.enabled && name == ROOT && role == ROOT {
                    return Err("user root keeps role root while authentication is on".into());
                }
                if !self.user(name)?.roles.remove(role) {
                    return Err(format!("user {name} does not hold role {role}"));
                }
            }
            Change::RoleAdd(role) => {
                if role == ROOT || self.roles.contains_key(role) {
                    return Err(format!("role {role} already exists"));
                }
                self.roles.insert(role.clone(), Role::default());
            }
            Change::RoleDelete(role) => {
                if role == ROOT {
                    return Err("role root cannot be deleted".into());
                }
                self.roles
                    .remove(role)
                    .ok_or_else(|| format!("no role {role}"))?;
                for u in self.users.values_mut() {
                    u.roles.remove(role);
                }
            }
            Change::RoleGrant(role, p) => {
                let r = self.role(role)?;
                match r
                    .permissions
                    .iter_mut()
                    .find(|q| q.key == p.key && q.range_end == p.range_end)
                {
                    Some(q) => q.kind = p.kind,
                    None => r.permissions.push(p.clone()),
                }
            }
            Change::RoleRevoke(role, p) => {
                let r = self.role(role)?;
                let before = r.permissions.len();
                r.permissions
                    .retain(|q| !(q.key == p.key && q.range_end == p.range_end));
                if r.permissions.len() == before {
                    return Err(format!("role {role} has no such permission"));
                }
            }
        }
        self.generation = next;
        Ok(())
    }

    fn user(&mut self, name: &str) -> Result<&mut User, String> {
        self.users
            .get_mut(name)
            .ok_or_else(|| format!("no user {name}"))
    }

    fn role(&mut self, name: &str) -> Result<&mut Role, String> {
        if name == ROOT {
            return Err("role root has every permission already".into());
        }
        self.roles
            .get_mut(name)
            .ok_or_else(|| format!("no role {name}"))
    }

    pub fn show(&self) -> proto::AuthShowResponse {
        proto::AuthShowResponse {
            enabled: self.enabled,
            users: self
                .users
                .iter()
                .map(|(name, u)| proto::AuthUser {
                    name: name.clone(),
                    roles: u.roles.iter().cloned().collect(),
                })
                .collect(),
            roles: self
                .roles
                .iter()
                .map(|(name, r)| proto::AuthRole {
                    name: name.clone(),
                    permissions: r.permissions.iter().map(Permission::to_proto).collect(),
                })
                .collect(),
        }
    }
}
