//! What a stand-in is started with: bearer tokens and their roles, the bookmark interval and
//! how many events each kind's history keeps.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use crate::verb::Verb;

/// What a token may do. There is no RBAC beyond these two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Every verb on every resource.
    Admin,
    /// `get`, `list` and `watch` only.
    Reader,
}

impl Role {
    /// Whether a token with this role may use `verb`.
    pub fn allows(self, verb: Verb) -> bool {
        match self {
            Self::Admin => true,
            Self::Reader => verb.is_read(),
        }
    }

    /// The user name a token with this role authenticates as (used in Forbidden messages).
    pub fn user(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Reader => "reader",
        }
    }
}

/// A role name that is neither `admin` nor `reader`.
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?} (admin or reader)")]
pub struct UnknownRole(String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Self::Admin),
            "reader" => Ok(Self::Reader),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

/// A stand-in's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bearer token -> role. A request with any other token, or none, gets 401.
    pub tokens: BTreeMap<String, Role>,
    /// How often a watch that asked for bookmarks (`allowWatchBookmarks=true`) gets one.
    pub bookmark_interval: Duration,
    /// How many events each kind's history keeps; a watch from an older resourceVersion gets
    /// `410 Expired`.
    pub history_size: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tokens: BTreeMap::new(),
            bookmark_interval: Duration::from_secs(60),
            history_size: 1000,
        }
    }
}

impl Config {
    /// This configuration with one more token.
    pub fn with_token(mut self, token: &str, role: Role) -> Self {
        self.tokens.insert(token.to_owned(), role);
        self
    }
}
