//! Secrets: where passphrases come from, refusing secrets on the command line, redaction.
//!
//! Rules (ARCHITECTURE.md, RELIABILITY.md rows 25/26):
//! - A passphrase comes from `PGKEEP_PASSPHRASE`, `PGKEEP_PASSPHRASE_FILE` (first line of the
//!   file), the `passphrase_file` of the repository in the config file, or a prompt on a
//!   terminal. Never from a command-line value (it would show in the process list).
//! - A new passphrase (`repo key add`) comes from `PGKEEP_NEW_PASSPHRASE`,
//!   `PGKEEP_NEW_PASSPHRASE_FILE`, or a prompt asked twice.
//! - A PostgreSQL connection string holding a password and a repository URL holding
//!   credentials are refused with a hint; the refused value is never echoed.
//! - [`redact`] masks credentials in any text that may hold a URL or a conninfo; the CLI runs
//!   every error message through it as a last line of defence.

use std::fmt;
use std::io::IsTerminal;
use std::path::Path;

use zeroize::Zeroizing;

use crate::config::Env;
use crate::error::{Error, ErrorKind, Result};

/// A secret string, wiped from memory on drop, never shown by `Debug`.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(Zeroizing::new(s.into()))
    }

    /// The secret text. Keep the borrow short and never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the passphrases of one run come from, resolved once at start.
///
/// `current` opens the repository; `new` is the passphrase being created (`repo key add`).
/// `repo init` uses `current` as the passphrase of the new repository (asked twice when
/// prompted). When a value is missing and `interactive` is true, the user is prompted on the
/// terminal.
#[derive(Debug, Clone, Default)]
pub struct Passphrases {
    current: Option<Secret>,
    new: Option<Secret>,
    interactive: bool,
}

/// Environment variable holding the passphrase.
pub const ENV_PASSPHRASE: &str = "PGKEEP_PASSPHRASE";
/// Environment variable naming a file whose first line is the passphrase.
pub const ENV_PASSPHRASE_FILE: &str = "PGKEEP_PASSPHRASE_FILE";
/// Environment variable holding the passphrase of `copy`'s target repository.
pub const ENV_TO_PASSPHRASE: &str = "PGKEEP_TO_PASSPHRASE";
/// Environment variable naming a file holding the passphrase of `copy`'s target repository.
pub const ENV_TO_PASSPHRASE_FILE: &str = "PGKEEP_TO_PASSPHRASE_FILE";
/// Environment variable holding the new passphrase for `repo key add`.
pub const ENV_NEW_PASSPHRASE: &str = "PGKEEP_NEW_PASSPHRASE";
/// Environment variable naming a file holding the new passphrase for `repo key add`.
pub const ENV_NEW_PASSPHRASE_FILE: &str = "PGKEEP_NEW_PASSPHRASE_FILE";

impl Passphrases {
    /// Resolves the passphrase sources from the environment and, for the current one, the
    /// configured `passphrase_file` (lowest precedence). Prompts are allowed when stdin is a
    /// terminal. Fails (exit 2) when both a variable and its `_FILE` twin are set, or a file
    /// cannot be read or is empty.
    pub fn from_env(env: &Env, config_passphrase_file: Option<&Path>) -> Result<Self> {
        let current = match source(env, ENV_PASSPHRASE, ENV_PASSPHRASE_FILE)? {
            Some(s) => Some(s),
            None => match config_passphrase_file {
                Some(p) => Some(read_passphrase_file(p, "repository.passphrase_file")?),
                None => None,
            },
        };
        let new = source(env, ENV_NEW_PASSPHRASE, ENV_NEW_PASSPHRASE_FILE)?;
        Ok(Passphrases {
            current,
            new,
            interactive: std::io::stdin().is_terminal(),
        })
    }

    /// The passphrases of a second repository (`copy --to`): `PGKEEP_TO_PASSPHRASE` or
    /// `PGKEEP_TO_PASSPHRASE_FILE`, else that repository's configured `passphrase_file`.
    /// Never prompts: a copy usually runs unattended, and one prompt for two repositories
    /// would be ambiguous.
    pub fn for_target(env: &Env, config_passphrase_file: Option<&Path>) -> Result<Self> {
        let current = match source(env, ENV_TO_PASSPHRASE, ENV_TO_PASSPHRASE_FILE)? {
            Some(s) => Some(s),
            None => match config_passphrase_file {
                Some(p) => Some(read_passphrase_file(p, "repository.passphrase_file")?),
                None => None,
            },
        };
        Ok(Passphrases {
            current,
            new: None,
            interactive: false,
        })
    }

    /// Fixed passphrases and no prompting: for tests and programs embedding pgkeep.
    pub fn fixed(current: Option<&str>, new: Option<&str>) -> Self {
        Passphrases {
            current: current.map(Secret::new),
            new: new.map(Secret::new),
            interactive: false,
        }
    }

    /// True when a current passphrase is available without asking, or can be asked for.
    pub fn has_source(&self) -> bool {
        self.current.is_some() || self.interactive
    }

    /// True when a current passphrase was given (environment or file), not prompted.
    pub fn is_given(&self) -> bool {
        self.current.is_some()
    }

    /// The current passphrase when given by the environment or a file (never prompts).
    pub fn given(&self) -> Option<&Secret> {
        self.current.as_ref()
    }

    /// The passphrase to open an existing repository: the given one, else a prompt on the
    /// terminal, else `None`.
    pub fn current(&self) -> Result<Option<Secret>> {
        if let Some(s) = &self.current {
            return Ok(Some(s.clone()));
        }
        if self.interactive {
            return prompt("Repository passphrase: ").map(Some);
        }
        Ok(None)
    }

    /// The passphrase for a repository being created: the given one, else asked twice on the
    /// terminal, else `None`.
    pub fn for_init(&self) -> Result<Option<Secret>> {
        if let Some(s) = &self.current {
            return Ok(Some(s.clone()));
        }
        if self.interactive {
            return prompt_twice("New repository passphrase: ").map(Some);
        }
        Ok(None)
    }

    /// The new passphrase for `repo key add`: `PGKEEP_NEW_PASSPHRASE(_FILE)`, else asked twice
    /// on the terminal. Fails (exit 2) when neither is possible.
    pub fn new_key(&self) -> Result<Secret> {
        if let Some(s) = &self.new {
            return Ok(s.clone());
        }
        if self.interactive {
            return prompt_twice("New passphrase for the added key: ");
        }
        Err(Error::usage_hint(
            "no new passphrase given for the key to add",
            format!("set {ENV_NEW_PASSPHRASE} or {ENV_NEW_PASSPHRASE_FILE}, or run on a terminal to be asked"),
        ))
    }
}

fn source(env: &Env, var: &str, file_var: &str) -> Result<Option<Secret>> {
    let direct = env.get(var).filter(|v| !v.is_empty());
    let file = env.get(file_var).filter(|v| !v.is_empty());
    match (direct, file) {
        (Some(_), Some(_)) => Err(Error::usage_hint(
            format!("both {var} and {file_var} are set"),
            "unset one of them",
        )),
        (Some(v), None) => Ok(Some(Secret::new(v))),
        (None, Some(f)) => read_passphrase_file(Path::new(&f), file_var).map(Some),
        (None, None) => Ok(None),
    }
}

/// Reads the first line of a passphrase file (without its line ending). Warns when the file
/// is readable by group or others; fails (exit 2) when it cannot be read or the line is empty.
pub fn read_passphrase_file(path: &Path, what: &str) -> Result<Secret> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        Error::usage(format!(
            "{what}: cannot read passphrase file {}: {e}",
            path.display()
        ))
    })?);
    warn_if_readable_by_others(path, "passphrase file");
    let first = text.lines().next().unwrap_or("");
    if first.is_empty() {
        return Err(Error::usage(format!(
            "{what}: the first line of passphrase file {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(first))
}

/// Mode bits of `path` that give group or others any access (`mode & 0o077`), or 0.
pub fn group_other_bits(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o077)
        .unwrap_or(0)
}

fn warn_if_readable_by_others(path: &Path, what: &str) {
    let bits = group_other_bits(path);
    if bits != 0 {
        tracing::warn!(
            "{what} {} is accessible by group or others (mode bits {bits:03o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
}

fn prompt(text: &str) -> Result<Secret> {
    let p = Zeroizing::new(
        rpassword::prompt_password(text)
            .map_err(|e| Error::io("reading a passphrase from the terminal", e))?,
    );
    if p.is_empty() {
        return Err(Error::usage("empty passphrase"));
    }
    Ok(Secret::new(p.as_str()))
}

fn prompt_twice(text: &str) -> Result<Secret> {
    let first = prompt(text)?;
    let second = prompt("Enter it again: ")?;
    if first.expose() != second.expose() {
        return Err(Error::new(ErrorKind::Usage, "the passphrases do not match"));
    }
    Ok(first)
}

/// Refuses a PostgreSQL connection string that holds a password (keyword/value
/// `password=...` or a URI `postgresql://user:secret@host` / `?password=`). `source` names
/// where it came from (`--pg`, `PGKEEP_PG`, a config key). The value is never echoed.
pub fn check_conninfo(conninfo: &str, source: &str) -> Result<()> {
    if conninfo_has_password(conninfo) {
        return Err(Error::usage_hint(
            format!("{source}: the connection string holds a password, which is refused (it would show in the process list, logs or files)"),
            "remove it and give the password through PGPASSWORD or ~/.pgpass (or PGPASSFILE)",
        ));
    }
    Ok(())
}

fn conninfo_has_password(s: &str) -> bool {
    let trimmed = s.trim_start();
    let lower = trimmed.to_ascii_lowercase();
    if lower.starts_with("postgresql://") || lower.starts_with("postgres://") {
        let rest = &trimmed[trimmed.find("://").map(|i| i + 3).unwrap_or(0)..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@') {
            if authority[..at].contains(':') {
                return true;
            }
        }
        if let Some(q) = rest.find('?') {
            return rest[q + 1..].split('&').any(|kv| {
                kv.split('=')
                    .next()
                    .is_some_and(|k| k.eq_ignore_ascii_case("password"))
            });
        }
        return false;
    }
    keyword_values(trimmed)
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"))
}

/// Splits a keyword/value conninfo into pairs, honouring single quotes and backslashes.
fn keyword_values(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            if key.is_empty() && chars.peek().is_none() {
                return out;
            }
            // Malformed: skip this token and go on, so a later `password=` is still found.
            if chars.peek().is_none() {
                return out;
            }
            continue;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Refuses a repository URL that carries credentials: a user or password before `@`, or a
/// query parameter named like a key, secret, token or signature. `source` names where it came
/// from (`--repo`, `PGKEEP_REPO`, a config key). The value is never echoed.
pub fn check_repo_url(url: &str, source: &str) -> Result<()> {
    let Some(scheme_end) = url.find("://") else {
        return Ok(()); // a plain path
    };
    let scheme = url[..scheme_end].to_ascii_lowercase();
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let has_userinfo = rest[..authority_end].contains('@');
    let has_secret_param = rest.find('?').is_some_and(|q| {
        rest[q + 1..]
            .split('&')
            .any(|kv| is_secret_name(kv.split('=').next().unwrap_or("")))
    });
    if has_userinfo || has_secret_param {
        let hint = match scheme.as_str() {
            "s3" => "remove them and use the AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or an instance role",
            "az" => "remove them and use the AZURE_STORAGE_* variables (AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY) or a managed identity",
            "gs" => "remove them and use GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT",
            _ => "remove them; storage credentials come from the environment (AWS_*, AZURE_STORAGE_*, GOOGLE_* variables)",
        };
        return Err(Error::usage_hint(
            format!("{source}: the repository URL holds credentials, which is refused (they would show in the process list, logs or files)"),
            hint,
        ));
    }
    Ok(())
}

/// True for a key or parameter name that designates a secret: it contains `password`,
/// `passwd`, `secret`, `passphrase`, `token`, `credential`, or is a signature / key parameter
/// (`sig`, `key`, `*_key`, `*-key`). A name ending in `_file`, `_path`, `_command` or `_env`
/// names where a secret is (a file, a program, an environment variable), not the secret, and
/// is not one: `[notify]`'s `password_env` and `secret_env` keep the secret out of the file.
pub fn is_secret_name(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase();
    if n.is_empty()
        || n.ends_with("_file")
        || n.ends_with("_path")
        || n.ends_with("_command")
        || n.ends_with("_env")
    {
        return false;
    }
    [
        "password",
        "passwd",
        "secret",
        "passphrase",
        "token",
        "credential",
    ]
    .iter()
    .any(|w| n.contains(w))
        || n == "sig"
        || n == "key"
        || n.ends_with("_key")
        || n.ends_with("-key")
        || n == "x-amz-signature"
}

/// Masks credentials in free text: the password (or the whole user part when there is no
/// password) of every `scheme://user:pass@host`, and the value of every `name=value` whose
/// name [`is_secret_name`] (conninfo `password=...`, URL query `?sig=...`, quoted values
/// included). Everything else is kept as is.
pub fn redact(text: &str) -> String {
    redact_pairs(&redact_userinfo(text))
}

fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push_str(":***");
                }
                None => out.push_str("***"),
            }
            out.push_str(&authority[at..]);
        } else {
            out.push_str(authority);
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn redact_pairs(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        if bytes[i] != b'=' {
            i += 1;
            continue;
        }
        // The name before `=` (letters, digits, `_`, `-`, `.`), allowing spaces before `=`.
        let mut name_end = i;
        while name_end > 0 && bytes[name_end - 1] == b' ' {
            name_end -= 1;
        }
        let mut name_start = name_end;
        while name_start > 0 && {
            let c = bytes[name_start - 1];
            c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.'
        } {
            name_start -= 1;
        }
        let name = &text[name_start..name_end];
        if !is_secret_name(name) {
            i += 1;
            continue;
        }
        let mut v = i + 1;
        while v < bytes.len() && bytes[v] == b' ' {
            v += 1;
        }
        let value_start = v;
        if v < bytes.len() && (bytes[v] == b'\'' || bytes[v] == b'"') {
            let quote = bytes[v];
            v += 1;
            while v < bytes.len() && bytes[v] != quote {
                if bytes[v] == b'\\' {
                    v += 1;
                }
                v += 1;
            }
            v = (v + 1).min(bytes.len());
        } else {
            while v < bytes.len()
                && !bytes[v].is_ascii_whitespace()
                && !matches!(bytes[v], b'&' | b';' | b',' | b'"' | b')' | b'}')
            {
                v += 1;
            }
        }
        if v > value_start {
            out.push_str(&text[copied..value_start]);
            out.push_str("***");
            copied = v;
        }
        i = v.max(i + 1);
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_passwords_are_detected() {
        let table = [
            ("host=/tmp port=5432 user=postgres", false),
            ("dbname=password user=x", false),
            ("host=db password=hunter2", true),
            ("host=db password = 'hun ter2'", true),
            ("host=db PASSWORD=x", true),
            ("application_name='a b' password=x", true),
            ("postgresql://user@db:5432/app", false),
            ("postgresql://user:hunter2@db:5432/app", true),
            ("postgres://db/app?password=hunter2", true),
            ("postgres://db/app?sslmode=require", false),
            ("", false),
        ];
        for (s, expected) in table {
            assert_eq!(conninfo_has_password(s), expected, "{s}");
        }
    }

    #[test]
    fn conninfo_refusal_message_is_exact_and_hides_the_secret() {
        let e = check_conninfo("host=db password=hunter2", "--pg").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            e.to_string(),
            "--pg: the connection string holds a password, which is refused (it would show in the process list, logs or files)\n\
             HINT: remove it and give the password through PGPASSWORD or ~/.pgpass (or PGPASSFILE)"
        );
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn repo_urls_with_credentials_are_refused() {
        let table = [
            ("/var/lib/pgkeep", true),
            ("file:///var/lib/pgkeep", true),
            ("s3://bucket/prefix", true),
            ("s3://AKIA:SECRETX@bucket/prefix", false),
            ("s3://AKIA@bucket/prefix", false),
            ("az://container/p?sig=abc&se=2030", false),
            ("gs://bucket/p?access_token=x", false),
            ("s3://bucket/p?region=eu", true),
        ];
        for (url, ok) in table {
            assert_eq!(check_repo_url(url, "--repo").is_ok(), ok, "{url}");
        }
        let e = check_repo_url("s3://AKIA:SECRETX@bucket/prefix", "--repo").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            e.to_string(),
            "--repo: the repository URL holds credentials, which is refused (they would show in the process list, logs or files)\n\
             HINT: remove them and use the AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or an instance role"
        );
        assert!(!e.to_string().contains("SECRETX"));
    }

    #[test]
    fn redaction_masks_credentials_only() {
        let table = [
            ("s3://AKIA:SECRETX@bucket/p", "s3://AKIA:***@bucket/p"),
            (
                "see https://tok@host/x and more",
                "see https://***@host/x and more",
            ),
            ("plain /var/lib/pgkeep path", "plain /var/lib/pgkeep path"),
            (
                "host=db password=hunter2 user=x",
                "host=db password=*** user=x",
            ),
            (
                "host=db password = 'a b c' user=x",
                "host=db password = *** user=x",
            ),
            (
                "az://c/p?sp=r&sig=abc%2F&se=1",
                "az://c/p?sp=r&sig=***&se=1",
            ),
            ("{\"token\":\"x\"} token=abc", "{\"token\":\"x\"} token=***"),
            ("passphrase_file=/etc/p", "passphrase_file=/etc/p"),
            (
                "postgresql://u:pw@h/db?password=z",
                "postgresql://u:***@h/db?password=***",
            ),
            ("no secrets: a=b c==d", "no secrets: a=b c==d"),
        ];
        for (input, expected) in table {
            assert_eq!(redact(input), expected, "{input}");
        }
    }

    #[test]
    fn secret_names() {
        for n in [
            "password",
            "PGPASSWORD",
            "webhook_token",
            "secret_access_key",
            "sig",
            "passphrase",
        ] {
            assert!(is_secret_name(n), "{n}");
        }
        for n in [
            "passphrase_file",
            "token_command",
            "password_env",
            "secret_env",
            "routing_key_env",
            "url",
            "region",
            "keys",
            "monkey",
        ] {
            assert!(!is_secret_name(n), "{n}");
        }
    }

    #[test]
    fn passphrase_sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pass");
        std::fs::write(&f, "from-file\nsecond line\n").unwrap();
        let fs = f.to_str().unwrap();

        let env = Env::from_pairs([(ENV_PASSPHRASE, "direct")]);
        let p = Passphrases::from_env(&env, None).unwrap();
        assert_eq!(p.current().unwrap().unwrap().expose(), "direct");

        let env = Env::from_pairs([(ENV_PASSPHRASE_FILE, fs)]);
        let p = Passphrases::from_env(&env, None).unwrap();
        assert_eq!(p.current().unwrap().unwrap().expose(), "from-file");

        // The configured file is the lowest precedence.
        let p = Passphrases::from_env(&Env::from_pairs([(ENV_PASSPHRASE, "direct")]), Some(&f))
            .unwrap();
        assert_eq!(p.current().unwrap().unwrap().expose(), "direct");
        let p = Passphrases::from_env(&Env::default(), Some(&f)).unwrap();
        assert_eq!(p.current().unwrap().unwrap().expose(), "from-file");

        let env = Env::from_pairs([(ENV_PASSPHRASE, "a"), (ENV_PASSPHRASE_FILE, fs)]);
        let e = Passphrases::from_env(&env, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "both PGKEEP_PASSPHRASE and PGKEEP_PASSPHRASE_FILE are set\nHINT: unset one of them"
        );

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\nx\n").unwrap();
        let env = Env::from_pairs([(ENV_PASSPHRASE_FILE, empty.to_str().unwrap())]);
        let e = Passphrases::from_env(&env, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "PGKEEP_PASSPHRASE_FILE: the first line of passphrase file {} is empty",
                empty.display()
            )
        );
        assert_eq!(e.exit_code(), 2);

        let p = Passphrases::fixed(None, None);
        assert!(p.current().unwrap().is_none());
        assert_eq!(p.new_key().unwrap_err().exit_code(), 2);
        assert!(format!("{:?}", Secret::new("hunter2"))
            .find("hunter2")
            .is_none());
    }
}
