//! Basic authentication of the listener (`[daemon] user`, with the password from
//! `password_file` or `PGKEEP_DAEMON_PASSWORD`).

use std::path::Path;

use axum::http::HeaderMap;
use base64::Engine as _;

use pgkeep_core::config::Env;
use pgkeep_core::error::{Error, Result};
use pgkeep_core::schedule::DaemonConfig;

/// The variable holding the password when `[daemon] password_file` is not set.
pub const PASSWORD_ENV: &str = "PGKEEP_DAEMON_PASSWORD";

/// The credentials every request must carry. The password is kept as a hash only.
#[derive(Clone)]
pub struct BasicAuth {
    user: blake3::Hash,
    password: blake3::Hash,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BasicAuth(..)")
    }
}

impl BasicAuth {
    /// The credentials `[daemon]` asks for; `None` without `user`.
    pub fn from_config(d: &DaemonConfig, env: &Env) -> Result<Option<BasicAuth>> {
        let Some(user) = d.user.as_deref() else {
            if d.password_file.is_some() {
                tracing::warn!(
                    "daemon: [daemon] password_file is set without user: no authentication"
                );
            }
            return Ok(None);
        };
        if user.is_empty() || user.contains(':') {
            return Err(Error::usage(
                "[daemon] user must be non-empty and hold no ':' (basic authentication)",
            ));
        }
        let password = match &d.password_file {
            Some(p) => read_password_file(p)?,
            None => env.get(PASSWORD_ENV).unwrap_or_default(),
        };
        if password.is_empty() {
            return Err(Error::usage_hint(
                "[daemon] user is set but no password is given",
                format!("set [daemon] password_file (mode 0600) or {PASSWORD_ENV}"),
            ));
        }
        Ok(Some(BasicAuth::new(user, &password)))
    }

    /// Credentials from a user name and password.
    pub fn new(user: &str, password: &str) -> BasicAuth {
        BasicAuth {
            user: blake3::hash(user.as_bytes()),
            password: blake3::hash(password.as_bytes()),
        }
    }

    /// Whether the request's `Authorization: Basic ...` header holds the credentials. The
    /// comparison is constant-time (hashes compared with `blake3::Hash`'s constant-time
    /// equality, both always compared).
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let Some((scheme, b64)) = value.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
            return false;
        };
        let (user, password) = match raw.iter().position(|&b| b == b':') {
            Some(i) => (&raw[..i], &raw[i + 1..]),
            None => (&raw[..], &[][..]),
        };
        let user_ok = blake3::hash(user) == self.user;
        let password_ok = blake3::hash(password) == self.password;
        user_ok & password_ok
    }
}

/// Reads the password file, refusing one that others may read or write.
fn read_password_file(path: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::io(
            format!("reading [daemon] password_file {}", path.display()),
            e,
        )
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::usage_hint(
            format!(
                "[daemon] password_file {} has mode {mode:04o}: group or others may read it",
                path.display()
            ),
            format!("chmod 600 {}", path.display()),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::io(
            format!("reading [daemon] password_file {}", path.display()),
            e,
        )
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn header(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    fn basic(user: &str, pass: &str) -> String {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        format!("Basic {b}")
    }

    #[test]
    fn accepts_only_the_right_credentials() {
        let a = BasicAuth::new("ops", "s3cret:x");
        assert!(a.allows(&header(&basic("ops", "s3cret:x"))));
        assert!(a.allows(&header(&basic("ops", "s3cret:x").replace("Basic", "basic"))));
        assert!(!a.allows(&header(&basic("ops", "s3cret"))));
        assert!(!a.allows(&header(&basic("op", "s3cret:x"))));
        assert!(!a.allows(&header("Bearer abc")));
        assert!(!a.allows(&header("Basic !!!")));
        assert!(!a.allows(&HeaderMap::new()));
    }

    #[test]
    fn password_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "hunter2\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let d = DaemonConfig {
            user: Some("ops".into()),
            password_file: Some(p.clone()),
            ..DaemonConfig::default()
        };
        let e = BasicAuth::from_config(&d, &Env::default()).unwrap_err();
        assert!(e.to_string().contains("0644"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let a = BasicAuth::from_config(&d, &Env::default())
            .unwrap()
            .unwrap();
        assert!(a.allows(&header(&basic("ops", "hunter2"))));
        let none = DaemonConfig {
            user: Some("ops".into()),
            ..DaemonConfig::default()
        };
        assert!(BasicAuth::from_config(&none, &Env::default()).is_err());
        assert!(
            BasicAuth::from_config(&DaemonConfig::default(), &Env::default())
                .unwrap()
                .is_none()
        );
    }
}
