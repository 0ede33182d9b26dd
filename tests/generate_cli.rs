//! `pgkeep generate systemd|cron|k8s|completions|man` through the built binary: the units
//! pass `systemd-analyze verify`, the cron.d lines pass a cron syntax check and their times
//! round-trip, the manifests pass `kubernetes-validate` (PyPI), the bash completion knows
//! the commands, and the man page renders with `man -l`.

mod cli_support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cli_support::Sandbox;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");

/// A configuration with a local repository (outside /tmp, so the units keep PrivateTmp),
/// a listener and schedules of several cron forms.
/// The file lives outside /tmp (in the target directory), where a unit would not see it
/// with PrivateTmp.
fn config(schedules: &str, listen: &str) -> (tempfile::TempDir, PathBuf) {
    let text = format!(
        "[[repository]]\nname = \"local\"\nurl = \"/var/lib/pgkeep-generate-test\"\n\n\
         [[cluster]]\nname = \"main\"\npg = \"host=/var/run/postgresql dbname=postgres\"\nrepository = \"local\"\n\n\
         [daemon]\nlisten = \"{listen}\"\nstop_timeout = \"2m\"\n\n{schedules}"
    );
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("pgkeep.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir, path)
}

const SCHEDULES: &str = "\
[[schedule]]
job = \"backup\"
cron = \"30 2 * * *\"
label = \"nightly\"

[[schedule]]
job = \"dump\"
cron = \"0 15 */6 * * *\"
db = \"app\"
missed = \"skip\"
jitter = \"10m\"

[[schedule]]
job = \"expire\"
cron = \"@weekly\"

[[schedule]]
job = \"check\"
cron = \"5,35 9-17 * * MON-FRI\"

[[schedule]]
job = \"verify\"
cron = \"0 4 1,15 JAN,JUL *\"
";

fn generate(s: &Sandbox, config: &Path, args: &[&str]) -> cli_support::Run {
    let mut all = vec!["--config", config.to_str().unwrap(), "generate"];
    all.extend_from_slice(args);
    // A passphrase in the environment must never land in a generated file.
    s.run(&all, &[("PGKEEP_PASSPHRASE", "hunter2-do-not-leak")])
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn files_of(json: &serde_json::Value) -> Vec<String> {
    json["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

/// `tool ARGS`, failing the test with how to install it when it is missing.
fn tool(name: &str, args: &[&str], install: &str) -> std::process::Output {
    match Command::new(name).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("{name} cannot run ({e}): {install}"),
    }
}

#[test]
fn generate_systemd_units_pass_systemd_analyze_verify() {
    let s = Sandbox::new();
    let (_cfg_dir, cfg) = config(SCHEDULES, "127.0.0.1:9187");
    for (mode, expected) in [
        ("daemon", vec!["pgkeep.service"]),
        (
            "jobs",
            vec![
                "pgkeep-backup-main.service",
                "pgkeep-backup-main.timer",
                "pgkeep-dump-main-app.service",
                "pgkeep-dump-main-app.timer",
                "pgkeep-expire-main.service",
                "pgkeep-expire-main.timer",
                "pgkeep-check-main.service",
                "pgkeep-check-main.timer",
                "pgkeep-verify-main.service",
                "pgkeep-verify-main.timer",
            ],
        ),
    ] {
        let dir = s.path().join(format!("systemd-{mode}"));
        let out = generate(
            &s,
            &cfg,
            &[
                "systemd",
                "--mode",
                mode,
                "--binary",
                BIN,
                "--output",
                dir.to_str().unwrap(),
                "--json",
            ],
        )
        .expect(0);
        let json = out.json();
        assert_eq!(files_of(&json), expected, "{json}");
        for f in json["files"].as_array().unwrap() {
            let path = Path::new(f["path"].as_str().unwrap());
            assert!(path.starts_with(&dir), "{f}");
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "{}", path.display());
        }
        let units: Vec<String> = expected
            .iter()
            .map(|n| dir.join(n).to_str().unwrap().to_string())
            .collect();
        let mut args = vec!["verify"];
        args.extend(units.iter().map(String::as_str));
        let v = tool(
            "systemd-analyze",
            &args,
            "install systemd (Debian: apt-get install systemd)",
        );
        assert!(
            v.status.success() && v.stderr.is_empty(),
            "systemd-analyze verify ({mode}):\n{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        for n in expected.iter().filter(|n| n.ends_with(".service")) {
            let unit = read(&dir, n);
            for line in [
                "ProtectSystem=strict",
                "ReadWritePaths=/var/lib/pgkeep-generate-test",
                "PrivateTmp=true",
                "NoNewPrivileges=true",
                "ProtectHome=true",
                "User=postgres",
                "EnvironmentFile=-/etc/pgkeep/pgkeep.env",
                "StateDirectory=pgkeep-state",
            ] {
                assert!(unit.lines().any(|l| l == line), "{n}: no {line}:\n{unit}");
            }
            assert!(
                unit.contains(&format!("ExecStart={BIN} --config {}", cfg.display())),
                "{unit}"
            );
            assert!(!unit.contains("hunter2"), "{unit}");
        }
    }

    let daemon = read(&s.path().join("systemd-daemon"), "pgkeep.service");
    for line in [
        "Type=simple",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "KillMode=mixed",
    ] {
        assert!(daemon.lines().any(|l| l == line), "no {line}:\n{daemon}");
    }
    let stop: u64 = daemon
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec");
    assert!(
        stop > 120,
        "TimeoutStopSec={stop}s is not above stop_timeout 2m"
    );
    assert!(daemon.contains(&format!("{BIN} --config {} daemon", cfg.display())));

    let jobs = s.path().join("systemd-jobs");
    let timer = |n: &str| read(&jobs, &format!("pgkeep-{n}.timer"));
    let service = |n: &str| read(&jobs, &format!("pgkeep-{n}.service"));
    assert!(timer("backup-main").contains("OnCalendar=*-*-* 02:30:00 UTC\n"));
    assert!(timer("backup-main").contains("Persistent=true\n"));
    assert!(service("backup-main").contains(" --cluster main backup --label nightly\n"));
    // Seconds field, missed = "skip", jitter.
    let dump = timer("dump-main-app");
    assert!(dump.contains("OnCalendar=*-*-* 00/6:15:00 UTC\n"), "{dump}");
    assert!(!dump.contains("Persistent="), "{dump}");
    assert!(dump.contains("RandomizedDelaySec=600s\n"), "{dump}");
    assert!(dump.contains("AccuracySec=1s\n"), "{dump}");
    assert!(timer("expire-main").contains("OnCalendar=Sun *-*-* 00:00:00 UTC\n"));
    assert!(timer("check-main").contains("OnCalendar=Mon..Fri *-*-* 09..17:05,35:00 UTC\n"));
    assert!(timer("verify-main").contains("OnCalendar=*-01,07-01,15 04:00:00 UTC\n"));

    // What systemd-analyze thinks of each OnCalendar= (its own parser, the next times).
    for n in [
        "backup-main",
        "dump-main-app",
        "expire-main",
        "check-main",
        "verify-main",
    ] {
        let t = timer(n);
        let cal = t
            .lines()
            .find_map(|l| l.strip_prefix("OnCalendar="))
            .unwrap();
        let c = tool("systemd-analyze", &["calendar", cal], "install systemd");
        assert!(c.status.success(), "{cal}: {:?}", c);
    }
}

#[test]
fn generate_systemd_refuses_what_cannot_convert() {
    let s = Sandbox::new();
    let (_cfg_dir, cfg) = config(
        "[[schedule]]\njob = \"backup\"\ncron = \"0 0 1 * 1\"\n",
        "127.0.0.1:9187",
    );
    let out = generate(&s, &cfg, &["systemd", "--mode", "jobs"]).expect(2);
    assert!(
        out.stderr()
            .contains("both the day of month and the day of week are restricted"),
        "{}",
        out.stderr()
    );
    // The daemon reads that cron itself: --mode daemon is fine.
    generate(&s, &cfg, &["systemd", "--binary", BIN]).expect(0);
}

// ---------------------------------------------------------------------------------------
// cron.

struct Spec {
    min: u32,
    max: u32,
    names: &'static [&'static str],
    base: u32,
}

const FIELDS: [Spec; 6] = [
    Spec {
        min: 0,
        max: 59,
        names: &[],
        base: 0,
    },
    Spec {
        min: 0,
        max: 59,
        names: &[],
        base: 0,
    },
    Spec {
        min: 0,
        max: 23,
        names: &[],
        base: 0,
    },
    Spec {
        min: 1,
        max: 31,
        names: &[],
        base: 0,
    },
    Spec {
        min: 1,
        max: 12,
        names: &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ],
        base: 1,
    },
    Spec {
        min: 0,
        max: 7,
        names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
        base: 0,
    },
];

/// The values of one cron field (checker of its syntax): `*`, numbers, names, `a-b`, `/n`,
/// lists. Day of week 7 is 0.
fn cron_field(text: &str, spec: &Spec) -> Result<BTreeSet<u32>, String> {
    let value = |t: &str| -> Result<u32, String> {
        let v = match t.parse::<u32>() {
            Ok(v) => v,
            Err(_) => spec
                .names
                .iter()
                .position(|n| n.eq_ignore_ascii_case(t))
                .map(|i| i as u32 + spec.base)
                .ok_or_else(|| format!("bad value {t:?}"))?,
        };
        if v < spec.min || v > spec.max {
            return Err(format!("{v} out of {}-{}", spec.min, spec.max));
        }
        Ok(v)
    };
    let mut out = BTreeSet::new();
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, st)) => (
                r,
                st.parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("bad step in {item:?}"))?,
            ),
            None => (item, 1),
        };
        let (lo, hi) = if range == "*" {
            (spec.min, spec.max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else if item.contains('/') {
            return Err(format!("{item:?}: cron(8) wants a range before a step"));
        } else {
            let v = value(range)?;
            (v, v)
        };
        if lo > hi {
            return Err(format!("{item:?}: range backwards"));
        }
        for v in (lo..=hi).step_by(step as usize) {
            out.insert(if spec.max == 7 && v == 7 { 0 } else { v });
        }
    }
    Ok(out)
}

/// The six value sets (seconds first) of a `[[schedule]]` cron expression.
fn cron_sets(expr: &str) -> Vec<BTreeSet<u32>> {
    let expr = match expr {
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        "@weekly" => "0 0 * * 0",
        "@monthly" => "0 0 1 * *",
        "@yearly" | "@annually" => "0 0 1 1 *",
        e => e,
    };
    let mut f: Vec<&str> = expr.split_whitespace().collect();
    if f.len() == 5 {
        f.insert(0, "0");
    }
    assert_eq!(f.len(), 6, "{expr}");
    f.iter()
        .zip(FIELDS.iter())
        .map(|(t, spec)| cron_field(t, spec).unwrap_or_else(|e| panic!("{expr}: {e}")))
        .collect()
}

const CRON_SCHEDULES: &str = "\
[[schedule]]
job = \"backup\"
cron = \"30 2 * * *\"

[[schedule]]
job = \"dump\"
cron = \"0 0 */6 * * *\"
db = \"app\"

[[schedule]]
job = \"dump\"
cron = \"*/20 * * * *\"
all = true
label = \"50%\"

[[schedule]]
job = \"expire\"
cron = \"@weekly\"

[[schedule]]
job = \"check\"
cron = \"5,35 9-17 * * MON-FRI\"

[[schedule]]
job = \"verify\"
cron = \"0 4 1,15 JAN,JUL *\"

[[schedule]]
job = \"drill\"
cron = \"0 5 */2 * 6\"
";

#[test]
fn generate_cron_lines_are_valid_and_round_trip() {
    let s = Sandbox::new();
    let (_cfg_dir, cfg) = config(CRON_SCHEDULES, "127.0.0.1:9187");
    let printed = generate(&s, &cfg, &["cron", "--binary", BIN]).expect(0);
    assert!(
        printed.stdout().starts_with("# ==> pgkeep <==\n"),
        "{}",
        printed.stdout()
    );
    let dir = s.path().join("cron");
    let out = generate(
        &s,
        &cfg,
        &[
            "cron",
            "--binary",
            BIN,
            "--output",
            dir.to_str().unwrap(),
            "--json",
        ],
    )
    .expect(0);
    assert_eq!(files_of(&out.json()), ["pgkeep"]);
    let text = read(&dir, "pgkeep");
    assert_eq!(
        printed.stdout(),
        format!("# ==> pgkeep <==\n{text}"),
        "stdout and the file differ"
    );
    assert!(text.contains("\nPATH=/usr/local/sbin:"), "{text}");
    assert!(text.contains("\n# MAILTO="), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    let expected: Vec<&str> = CRON_SCHEDULES
        .lines()
        .filter_map(|l| l.strip_prefix("cron = \""))
        .map(|l| l.trim_end_matches('"'))
        .collect();
    let mut jobs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() == 1 && words[0].contains('=') {
            let (name, _) = words[0].split_once('=').unwrap();
            assert!(
                name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "bad environment line {line:?}"
            );
            continue;
        }
        // minute hour day month weekday user command...
        assert!(words.len() >= 7, "not 5 fields + user + command: {line:?}");
        let fields: Vec<BTreeSet<u32>> = words[..5]
            .iter()
            .zip(FIELDS[1..].iter())
            .map(|(t, spec)| cron_field(t, spec).unwrap_or_else(|e| panic!("{line:?}: {e}")))
            .collect();
        assert_eq!(words[5], "postgres", "{line:?}");
        assert_eq!(&words[6..8], ["flock", "-n"], "{line:?}");
        assert!(words[8].starts_with("/run/lock/pgkeep-"), "{line:?}");
        assert_eq!(words[9], BIN, "{line:?}");
        assert_eq!(
            words[10..12],
            ["--config", cfg.to_str().unwrap()],
            "{line:?}"
        );
        // An unescaped % ends the command in cron(8).
        assert!(
            !line
                .chars()
                .zip(line.chars().skip(1))
                .any(|(a, b)| a != '\\' && b == '%'),
            "{line:?}"
        );
        jobs.push((fields, line.to_string()));
    }
    assert_eq!(jobs.len(), expected.len(), "{text}");
    for ((fields, line), cron) in jobs.iter().zip(&expected) {
        let want = cron_sets(cron);
        assert_eq!(want[0], BTreeSet::from([0]), "{cron}");
        assert_eq!(fields[..], want[1..], "{cron} -> {line}");
    }
    assert!(
        jobs[2].1.ends_with(" dump --label '50\\%' --all"),
        "{}",
        jobs[2].1
    );
    assert!(jobs[6].1.starts_with("0 5 1-31/2 * 6 "), "{}", jobs[6].1);

    // A syntax check by a real cron parser too, when one is installed (Debian's cron
    // checks a crontab on `crontab -T`... only cronie has it; else the checker above).
    if Command::new("crontab")
        .arg("-T")
        .arg("/dev/null")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let user_lines: String = text
            .lines()
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                if w.len() >= 7 && !l.starts_with('#') {
                    format!("{} {}\n", w[..5].join(" "), w[6..].join(" "))
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        let f = s.path().join("crontab");
        std::fs::write(&f, user_lines).unwrap();
        let o = Command::new("crontab").arg("-T").arg(&f).output().unwrap();
        assert!(o.status.success(), "crontab -T: {o:?}");
    }
}

#[test]
fn generate_cron_refuses_seconds_and_the_daemon() {
    let s = Sandbox::new();
    let (_cfg_dir, cfg) = config(
        "[[schedule]]\njob = \"backup\"\ncron = \"*/10 * * * * *\"\n",
        "127.0.0.1:9187",
    );
    let out = generate(&s, &cfg, &["cron"]).expect(2);
    assert!(
        out.stderr().contains("cron(8) cannot express"),
        "{}",
        out.stderr()
    );
    let out = generate(&s, &cfg, &["cron", "--mode", "daemon"]).expect(2);
    assert!(
        out.stderr().contains("cron runs jobs only"),
        "{}",
        out.stderr()
    );
}

// ---------------------------------------------------------------------------------------
// Kubernetes.

fn kubernetes_validate(files: &[PathBuf]) {
    let mut args = vec!["--strict".to_string()];
    args.extend(files.iter().map(|f| f.to_str().unwrap().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = tool(
        "kubernetes-validate",
        &args,
        "run scripts/install-deps.sh (it runs `python3 -m pip install kubernetes-validate`)",
    );
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "kubernetes-validate:\n{out}");
    assert_eq!(
        out.matches(" passed for resource ").count(),
        files.len(),
        "kubernetes-validate:\n{out}"
    );
}

#[test]
fn generate_k8s_manifests_pass_kubernetes_validate() {
    let s = Sandbox::new();
    let (_cfg_dir, cfg) = config(CRON_SCHEDULES, "0.0.0.0:9187");
    let config_text = std::fs::read_to_string(&cfg).unwrap();

    let dir = s.path().join("k8s-daemon");
    let out = generate(
        &s,
        &cfg,
        &[
            "k8s",
            "--image",
            "registry.example/pgkeep:1.2",
            "--output",
            dir.to_str().unwrap(),
            "--json",
        ],
    )
    .expect(0);
    let names = files_of(&out.json());
    assert_eq!(
        names,
        [
            "pgkeep-config-configmap.yaml",
            "pgkeep-deployment.yaml",
            "pgkeep-service.yaml",
            "pgkeep-state-pvc.yaml",
            "pgkeep-repo-local-pvc.yaml",
        ]
    );
    kubernetes_validate(&names.iter().map(|n| dir.join(n)).collect::<Vec<_>>());
    let cm = read(&dir, "pgkeep-config-configmap.yaml");
    for line in config_text.lines().filter(|l| !l.is_empty()) {
        assert!(
            cm.contains(&format!("    {line}\n")),
            "{line:?} not in\n{cm}"
        );
    }
    let deploy = read(&dir, "pgkeep-deployment.yaml");
    for want in [
        "kind: Deployment",
        "image: \"registry.example/pgkeep:1.2\"",
        "livenessProbe:",
        "tcpSocket:",
        "the backups' health is\n# /healthz",
        "name: pgkeep-secrets",
        "claimName: pgkeep-repo-local",
        "mountPath: /var/lib/pgkeep-generate-test",
        "type: Recreate",
    ] {
        assert!(deploy.contains(want), "no {want}:\n{deploy}");
    }
    assert!(read(&dir, "pgkeep-service.yaml").contains("port: 9187"));

    let dir = s.path().join("k8s-jobs");
    let out = generate(
        &s,
        &cfg,
        &[
            "k8s",
            "--mode",
            "jobs",
            "--output",
            dir.to_str().unwrap(),
            "--json",
        ],
    )
    .expect(0);
    let names = files_of(&out.json());
    let cronjobs: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with("-cronjob.yaml"))
        .collect();
    assert_eq!(cronjobs.len(), 7, "{names:?}");
    kubernetes_validate(&names.iter().map(|n| dir.join(n)).collect::<Vec<_>>());
    let backup = read(&dir, "pgkeep-backup-main-cronjob.yaml");
    for want in [
        "kind: CronJob",
        "concurrencyPolicy: Forbid",
        "schedule: \"30 2 * * *\"",
        "timeZone: Etc/UTC",
        "image: \"pgkeep:latest\"",
        "- backup",
    ] {
        assert!(backup.contains(want), "no {want}:\n{backup}");
    }
    for n in &names {
        assert!(!read(&dir, n).contains("hunter2"), "{n}");
    }

    // On stdout: one stream for `kubectl apply -f -`.
    let printed = generate(&s, &cfg, &["k8s"]).expect(0).stdout();
    assert!(printed.starts_with("---\n# ==> pgkeep-config-configmap.yaml <==\n"));
    assert_eq!(printed.matches("\n---\n").count() + 1, 5, "{printed}");
}

#[test]
fn generate_k8s_refuses_inline_secrets_and_a_local_listener() {
    let s = Sandbox::new();
    let (_cfg_dir, cfg) = config(CRON_SCHEDULES, "127.0.0.1:9187");
    let out = generate(&s, &cfg, &["k8s"]).expect(2);
    assert!(out.stderr().contains("0.0.0.0:9187"), "{}", out.stderr());
    // Jobs do not listen.
    generate(&s, &cfg, &["k8s", "--mode", "jobs"]).expect(0);

    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(
        "\n[[notify.slack]]\nwebhook_url = \"https://hooks.slack.com/services/T0/B0/XYZ\"\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let out = generate(&s, &cfg, &["k8s", "--mode", "jobs"]).expect(2);
    assert!(out.stderr().contains("holds secrets"), "{}", out.stderr());
    assert!(!out.stdout().contains("XYZ"));
}

// ---------------------------------------------------------------------------------------
// Writing.

#[test]
fn generate_output_refuses_to_overwrite_without_force() {
    let s = Sandbox::new();
    let (_cfg_dir, cfg) = config(SCHEDULES, "127.0.0.1:9187");
    let dir = s.path().join("new/units");
    let args = [
        "systemd",
        "--binary",
        BIN,
        "--output",
        dir.to_str().unwrap(),
    ];
    let first = generate(&s, &cfg, &args).expect(0);
    assert!(first.stdout().starts_with("written "), "{}", first.stdout());
    let again = generate(&s, &cfg, &args).expect(0);
    assert!(
        again.stdout().starts_with("unchanged "),
        "{}",
        again.stdout()
    );

    let unit = dir.join("pgkeep.service");
    std::fs::write(&unit, "# edited by hand\n").unwrap();
    let out = generate(&s, &cfg, &args).expect(2);
    assert!(
        out.stderr().contains("exists with other contents"),
        "{}",
        out.stderr()
    );
    assert!(out.stderr().contains("--force"), "{}", out.stderr());
    assert_eq!(
        std::fs::read_to_string(&unit).unwrap(),
        "# edited by hand\n"
    );

    let mut forced = args.to_vec();
    forced.push("--force");
    let out = generate(&s, &cfg, &forced).expect(0);
    assert!(out.stdout().starts_with("replaced "), "{}", out.stdout());
    assert!(std::fs::read_to_string(&unit)
        .unwrap()
        .contains("ExecReload="));
    assert_eq!(
        std::fs::metadata(&unit).unwrap().permissions().mode() & 0o777,
        0o644
    );

    // Without a configuration file there is nothing to generate from.
    let out = s.run(
        &[
            "--config",
            s.path().join("empty.toml").to_str().unwrap(),
            "generate",
            "systemd",
        ],
        &[],
    );
    assert_eq!(out.code(), 2, "{}", out.stderr());
}

// ---------------------------------------------------------------------------------------
// Completions and man pages.

#[test]
fn completions_and_man_page() {
    let s = Sandbox::new();
    let bash = s
        .run(&["generate", "completions", "bash"], &[])
        .expect(0)
        .stdout();
    assert!(bash.contains("drill"), "{bash}");
    assert!(bash.contains("complete -F"), "{bash}");
    // They need no configuration: a broken file does not stand in their way.
    let broken = s.path().join("broken.toml");
    std::fs::write(&broken, "[nonsense\n").unwrap();
    let broken = broken.to_str().unwrap();
    s.run(
        &["--config", broken, "generate", "completions", "bash"],
        &[],
    )
    .expect(0);
    s.run(&["--config", broken, "generate", "man"], &[])
        .expect(0);
    s.run(&["--config", broken, "generate", "cron"], &[])
        .expect(2);
    let zsh = s
        .run(&["generate", "completions", "zsh"], &[])
        .expect(0)
        .stdout();
    assert!(zsh.starts_with("#compdef pgkeep"), "{zsh}");
    let fish = s
        .run(&["generate", "completions", "fish"], &[])
        .expect(0)
        .stdout();
    assert!(fish.contains("complete -c pgkeep"), "{fish}");
    s.run(&["generate", "completions"], &[]).expect(2);

    let man = s.run(&["generate", "man"], &[]).expect(0).stdout();
    assert!(
        man.starts_with(".ie") || man.starts_with(".TH"),
        "{}",
        &man[..200.min(man.len())]
    );
    assert!(
        man.contains(".TH pgkeep 1"),
        "{}",
        &man[..400.min(man.len())]
    );

    let dir = s.path().join("man1");
    let out = s
        .run(
            &[
                "generate",
                "man",
                "--output",
                dir.to_str().unwrap(),
                "--json",
            ],
            &[],
        )
        .expect(0);
    let names = files_of(&out.json());
    for page in [
        "pgkeep.1",
        "pgkeep-backup.1",
        "pgkeep-drill.1",
        "pgkeep-repo-init.1",
        "pgkeep-generate.1",
    ] {
        assert!(names.iter().any(|n| n == page), "{page} not in {names:?}");
    }
    assert!(!names.iter().any(|n| n == "pgkeep-help.1"), "{names:?}");
    assert_eq!(read(&dir, "pgkeep.1"), man);
    let text = s
        .run(&["generate", "man", "--output", dir.to_str().unwrap()], &[])
        .expect(0)
        .stdout();
    assert!(
        text.contains("unchanged ") && text.contains("next: install -m 0644"),
        "{text}"
    );

    let rendered = Command::new("man")
        .args(["-l", dir.join("pgkeep.1").to_str().unwrap()])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .unwrap_or_else(|e| panic!("man cannot run ({e}): apt-get install man-db"));
    let text = String::from_utf8_lossy(&rendered.stdout);
    assert!(rendered.status.success(), "man -l: {rendered:?}");
    assert!(text.contains("pgkeep"), "{text}");
    assert!(text.contains("drill"), "{text}");
    assert!(!text.contains(".TH"), "not rendered:\n{text}");
}

#[test]
fn generate_with_spool_passphrase_file_and_a_remote_repository() {
    let s = Sandbox::new();
    let pass = s.path().join("passphrase");
    std::fs::write(&pass, "correct horse\n").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = s.path().join("pgkeep.toml");
    std::fs::write(
        &cfg,
        format!(
            "[options]\nspool_dir = \"/var/spool/pgkeep\"\n\n\
             [[repository]]\nname = \"local\"\nurl = \"file:///srv/pgkeep\"\npassphrase_file = \"{}\"\n\n\
             [[repository]]\nname = \"Off_Site\"\nurl = \"s3://bucket/prefix\"\n\n\
             [[cluster]]\nname = \"main\"\nrepository = \"local\"\n\n\
             [drill]\nscratch_dir = \"/home/scratch dir\"\n\n\
             [[schedule]]\njob = \"copy\"\ncron = \"0 5 * * *\"\nto = \"Off_Site\"\nwal = true\n",
            pass.display()
        ),
    )
    .unwrap();

    let dir = s.path().join("k8s");
    let out = generate(
        &s,
        &cfg,
        &[
            "k8s",
            "--mode",
            "jobs",
            "--output",
            dir.to_str().unwrap(),
            "--json",
        ],
    )
    .expect(0);
    let names = files_of(&out.json());
    assert_eq!(
        names,
        [
            "pgkeep-config-configmap.yaml",
            "pgkeep-copy-main-cronjob.yaml",
            "pgkeep-state-pvc.yaml",
            "pgkeep-repo-local-pvc.yaml",
            "pgkeep-spool-pvc.yaml",
        ]
    );
    kubernetes_validate(&names.iter().map(|n| dir.join(n)).collect::<Vec<_>>());
    let cj = read(&dir, "pgkeep-copy-main-cronjob.yaml");
    for want in [
        "secretName: pgkeep-passphrase-local",
        "subPath: passphrase",
        &format!("mountPath: {}", pass.display()),
        "mountPath: /srv/pgkeep",
        "mountPath: /var/spool/pgkeep",
        "- Off_Site",
        "- \"--wal\"",
    ] {
        assert!(cj.contains(want), "no {want}:\n{cj}");
    }
    assert!(!cj.contains("correct horse"));

    let dir = s.path().join("systemd");
    generate(
        &s,
        &cfg,
        &[
            "systemd",
            "--mode",
            "jobs",
            "--binary",
            BIN,
            "--output",
            dir.to_str().unwrap(),
        ],
    )
    .expect(0);
    let unit = read(&dir, "pgkeep-copy-main.service");
    for line in [
        "ReadWritePaths=/srv/pgkeep /var/spool/pgkeep \"/home/scratch dir\"",
        "ProtectHome=read-only",
        // The passphrase file is in the sandbox, under /tmp.
        "# Not PrivateTmp: a file or directory of the configuration is under /tmp or /var/tmp.",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line}:\n{unit}");
    }
    assert!(
        unit.contains(" --cluster main copy --to Off_Site --latest --wal\n"),
        "{unit}"
    );
    let files = [
        dir.join("pgkeep-copy-main.service"),
        dir.join("pgkeep-copy-main.timer"),
    ];
    let v = tool(
        "systemd-analyze",
        &[
            "verify",
            files[0].to_str().unwrap(),
            files[1].to_str().unwrap(),
        ],
        "install systemd",
    );
    assert!(v.status.success() && v.stderr.is_empty(), "{v:?}");
}
