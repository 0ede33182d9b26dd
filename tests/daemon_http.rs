//! Issue 17's HTTP listener through the built binary: `pgkeep --config FILE daemon` with
//! `[daemon] listen`, against a real archiving PostgreSQL cluster:
//! - `/metrics` is what `pgkeep metrics` gives plus the daemon's figures, and passes
//!   `promtool check metrics`;
//! - `/healthz` answers 200 while the check is OK and 503 naming the failing check once a
//!   threshold (reloaded by SIGHUP) is crossed;
//! - `/api/status|backups|history|schedules` answer JSON holding the backups made;
//! - the dashboard, loaded in headless Chromium, lists the backups, draws its charts, has no
//!   script error, and leaves a screenshot in `target/test-artifacts/dashboard.png`;
//! - basic authentication (401 with `WWW-Authenticate` without or with wrong credentials, a
//!   password file readable by others refused), HTTPS, a port already taken, SIGTERM → 0.

mod cli_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::{promtool, sample, start_archiving, switch_and_wait, Sandbox};

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `pgkeep --config FILE daemon`, running.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// The daemon's command, in the clean environment of [`Sandbox::run`].
    fn command(s: &Sandbox, cfg: &Path, envs: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", s.path())
            .env("PGKEEP_HEALTH_FREE_SPACE_WARN", "1")
            .env("PGKEEP_HEALTH_FREE_SPACE_CRIT", "1")
            .current_dir(s.path())
            .arg("--config")
            .arg(cfg)
            .arg("daemon");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts it and waits until `port` accepts connections.
    fn start(s: &Sandbox, cfg: &Path, port: u16, envs: &[(&str, &str)]) -> Daemon {
        let log = s.path().join(format!("daemon-{port}.log"));
        let child = Self::command(s, cfg, envs)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return d;
            }
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("the daemon exited ({st}) before listening:\n{}", d.log());
            }
            assert!(Instant::now() < deadline, "not listening:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// SIGTERM, and the exit code (within 60 s).
    fn stop(mut self) -> i32 {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One response: status code, headers (raw), body.
struct Resp {
    code: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.body))
    }
}

/// `curl URL` with extra arguments.
fn curl(url: &str, extra: &[&str]) -> Resp {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "180", "-D"])
        .arg(&head)
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    Resp {
        code: code.trim().parse().unwrap(),
        headers: std::fs::read_to_string(&head).unwrap_or_default(),
        body: body.to_string(),
    }
}

/// `target/`, from where cargo put the binary.
fn target_dir() -> PathBuf {
    Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

fn chromium(profile: &Path, args: &[&str], url: &str) -> (String, String) {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (Debian package chromium) is installed");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cluster_config(s: &Sandbox, c: &pgkeep_testing::Cluster, port: u16, health: &str) -> String {
    format!(
        "[[repository]]\nname = \"r\"\nurl = \"{repo}\"\n\n\
         [[cluster]]\nname = \"main\"\npgdata = \"{pgdata}\"\npg = \"{pg}\"\nrepository = \"r\"\n\n\
         [health]\n{health}\n\n\
         [daemon]\nlisten = \"127.0.0.1:{port}\"\nmissed_runs = \"skip\"\nstate_dir = \"{state}\"\n\n\
         [[schedule]]\njob = \"check\"\ncron = \"0 0 1 1 *\"\n\n\
         [[schedule]]\njob = \"backup\"\ncron = \"30 4 1 1 *\"\n",
        repo = s.repo().display(),
        pgdata = c.pgdata().display(),
        pg = c.conninfo(),
        state = s.path().join("state").display(),
    )
}

#[test]
fn daemon_serves_metrics_health_api_and_a_dashboard_of_the_repository() {
    let s = Sandbox::shared();
    let mut c = start_archiving(&s);
    let port = free_port();
    let cfg = s.path().join("daemon.toml");
    std::fs::write(&cfg, cluster_config(&s, &c, port, "")).unwrap();
    let cfg_s = cfg.to_str().unwrap();

    let first = s
        .run(
            &["--config", cfg_s, "--json", "backup", "--label", "nightly"],
            &[],
        )
        .expect(0)
        .json();
    c.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
        .unwrap();
    let second = s
        .run(&["--config", cfg_s, "--json", "backup"], &[])
        .expect(0)
        .json();
    let dump = s
        .run(
            &["--config", cfg_s, "--json", "dump", "--db", "postgres"],
            &[],
        )
        .expect(0)
        .json();
    // A dump drill: the dashboard shows the last drill and its RTO.
    s.run(
        &[
            "--config", cfg_s, "drill", "--dump", "latest", "--db", "postgres",
        ],
        &[],
    )
    .expect(0);
    switch_and_wait(&c);
    let ids: Vec<String> = [&first, &second, &dump]
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();

    let d = Daemon::start(&s, &cfg, port, &[]);
    let base = format!("http://127.0.0.1:{port}");

    // /metrics: the CLI's families and the daemon's, valid for Prometheus.
    let m = curl(&format!("{base}/metrics"), &[]);
    assert_eq!(m.code, 200, "{}", m.body);
    assert!(
        m.headers.contains("text/plain; version=0.0.4"),
        "{}",
        m.headers
    );
    promtool(&m.body);
    let cli = s
        .run(&["--config", cfg_s, "metrics"], &[])
        .expect(0)
        .stdout();
    let l = "{cluster=\"main\",kind=\"backup\",database=\"\"}";
    for name in [
        "pgkeep_backup_size_bytes",
        "pgkeep_backup_completed_timestamp_seconds",
    ] {
        let key = format!("{name}{l}");
        assert_eq!(sample(&m.body, &key), sample(&cli, &key), "{key}");
    }
    let next = sample(
        &m.body,
        "pgkeep_daemon_schedule_next_run_timestamp_seconds{schedule=\"check-main\",job=\"check\",cluster=\"main\"}",
    );
    assert!(next > chrono::Utc::now().timestamp() as f64, "{next}");
    assert_eq!(
        sample(&m.body, "pgkeep_daemon_cluster_up{cluster=\"main\"}"),
        1.0
    );
    assert!(m
        .body
        .contains("# TYPE pgkeep_daemon_schedule_skipped_runs_total counter"));

    // /healthz: OK, the archiving check end to end included.
    let h = curl(&format!("{base}/healthz"), &[]);
    assert_eq!(h.code, 200, "{}\n{}", h.body, d.log());
    assert!(h.body.starts_with("pgkeep health: OK"), "{}", h.body);
    let hj = curl(&format!("{base}/healthz?format=json"), &[]).json();
    assert_eq!(hj["status"], "ok", "{hj}");
    assert_eq!(hj["clusters"][0]["cluster"], "main");

    // /api/...
    let st = curl(&format!("{base}/api/status"), &[]);
    assert_eq!(st.code, 200);
    assert!(st.headers.contains("application/json"), "{}", st.headers);
    let st = st.json();
    assert_eq!(st[0]["cluster"], "main", "{st}");
    assert_eq!(st[0]["backup"]["id"], ids[1].as_str(), "{st}");
    assert_eq!(st[0]["dumps"][0]["database"], "postgres", "{st}");
    let rto = st[0]["last_drill"]["rto_secs"].as_f64().unwrap();
    assert!(rto > 0.0, "{st}");
    let bl = curl(&format!("{base}/api/backups?cluster=main"), &[]).json();
    let listed: Vec<&str> = bl[0]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    for id in &ids {
        assert!(listed.contains(&id.as_str()), "{id} not in {bl}");
    }
    assert_eq!(bl[0]["backups"][0]["label"], "nightly", "{bl}");
    let hist = curl(&format!("{base}/api/history?kind=backup"), &[]).json();
    let recs = hist[0]["records"].as_array().unwrap();
    assert_eq!(recs.len(), 2, "{hist}");
    assert_eq!(recs[1]["backup_id"], ids[1].as_str(), "{hist}");
    let all = curl(&format!("{base}/api/history?limit=1"), &[]).json();
    assert_eq!(all[0]["records"].as_array().unwrap().len(), 1, "{all}");
    let sc = curl(&format!("{base}/api/schedules"), &[]).json();
    let names: Vec<&str> = sc["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["check-main", "backup-main"], "{sc}");
    assert!(sc["schedules"][0]["next_run"].is_string(), "{sc}");
    let missing = curl(&format!("{base}/api/status?cluster=nope"), &[]);
    assert_eq!(missing.code, 404, "{}", missing.body);
    assert!(missing.json()["error"].as_str().unwrap().contains("nope"));
    assert_eq!(
        curl(&format!("{base}/api/history?kind=bogus"), &[]).code,
        400
    );
    assert_eq!(curl(&format!("{base}/nothing-here"), &[]).code, 404);

    // The dashboard in headless Chromium.
    let page = curl(&format!("{base}/"), &[]);
    assert_eq!(page.code, 200);
    assert!(page.headers.contains("text/html"), "{}", page.headers);
    for remote in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
        "src=\"//",
    ] {
        assert!(
            !page.body.contains(remote),
            "the dashboard must not load anything from elsewhere ({remote})"
        );
    }
    let profile = tempfile::tempdir().unwrap();
    let (dom, log) = chromium(profile.path(), &["--dump-dom"], &format!("{base}/"));
    assert!(
        dom.contains("data-ready=\"1\""),
        "not rendered:\n{dom}\n{log}"
    );
    assert!(
        dom.contains("<pre id=\"errors\"></pre>"),
        "script errors:\n{dom}"
    );
    let console_errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Uncaught") || (l.contains("CONSOLE") && l.contains("rror")))
        .collect();
    assert!(console_errors.is_empty(), "console errors:\n{log}");
    for id in &ids {
        assert!(dom.contains(id.as_str()), "{id} not on the page:\n{dom}");
    }
    assert!(dom.contains("nightly"), "the label is not shown");
    assert!(dom.contains("<svg class=\"chart\""), "no chart:\n{dom}");
    let drawn = dom
        .match_indices("<path class=\"s")
        .filter(|(i, _)| dom[*i..].starts_with("<path class=\"s0\" d=\"M"))
        .count();
    assert!(drawn >= 2, "no line drawn in the charts:\n{dom}");
    assert!(
        dom.contains("check-main") && dom.contains("backup-main"),
        "{dom}"
    );
    assert!(dom.contains("Recovery window"), "{dom}");
    assert!(
        dom.contains("RTO: <strong class=\"rto\">") && !dom.contains("class=\"rto\">–<"),
        "no RTO of the last drill:\n{dom}"
    );
    let shots = target_dir().join("test-artifacts");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        profile.path(),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=420,900",
            "--hide-scrollbars",
        ],
        &format!("{base}/"),
    );
    let meta = std::fs::metadata(&png).expect("a screenshot");
    assert!(meta.len() > 10_000, "{} bytes", meta.len());

    // A threshold crossed (the file reloaded by SIGHUP): 503, naming the check.
    std::fs::write(
        &cfg,
        cluster_config(&s, &c, port, "backup_warn_age = \"1s\"\n"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    d.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(60);
    let failing = loop {
        let h = curl(&format!("{base}/healthz"), &[]);
        if h.code == 503 {
            break h;
        }
        assert_eq!(h.code, 200, "{}", h.body);
        assert!(Instant::now() < deadline, "still healthy:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        failing.body.starts_with("pgkeep health: FAILING"),
        "{}",
        failing.body
    );
    assert!(
        failing.body.contains("WARNING   backup_age"),
        "{}",
        failing.body
    );
    let fj = curl(&format!("{base}/healthz?format=json"), &[]);
    assert_eq!(fj.code, 503);
    let fj = fj.json();
    assert_eq!(fj["status"], "failing", "{fj}");
    assert!(
        fj["clusters"][0]["failing"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "backup_age" && i["status"] == "warning"),
        "{fj}"
    );
    // Warnings may be tolerated.
    assert_eq!(curl(&format!("{base}/healthz?warning=ok"), &[]).code, 200);

    // Back to the defaults: healthy again; then a backup fails (the server is down): 503,
    // naming the failed run, and the dashboard shows the failure.
    std::fs::write(&cfg, cluster_config(&s, &c, port, "")).unwrap();
    d.signal("HUP");
    wait_for_health(&base, 200, &d);
    // RELIABILITY.md row 30: a failed run counts up the failures and leaves the time of the
    // last success where it was.
    let failures = "pgkeep_run_failures_total{cluster=\"main\",kind=\"backup\"}";
    let success =
        "pgkeep_last_success_timestamp_seconds{cluster=\"main\",kind=\"backup\",database=\"\"}";
    let before = curl(&format!("{base}/metrics"), &[]).body;
    let (failures_before, success_before) = (sample(&before, failures), sample(&before, success));
    c.stop().unwrap();
    let failed = s.run(&["--config", cfg_s, "backup"], &[]);
    assert!(![0, 3].contains(&failed.code()), "{}", failed.stderr());
    let h = wait_for_health(&base, 503, &d);
    assert!(h.body.contains("last_run:backup"), "{}", h.body);
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let m = curl(&format!("{base}/metrics"), &[]).body;
        if sample(&m, failures) > failures_before {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "{failures} did not count the failed backup:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(sample(&after, failures), failures_before + 1.0);
    assert_eq!(sample(&after, success), success_before, "{success} moved");
    assert_eq!(
        sample(
            &after,
            "pgkeep_last_run_result{cluster=\"main\",kind=\"backup\",database=\"\",result=\"failed\"}"
        ),
        1.0
    );
    let (dom, _) = chromium(profile.path(), &["--dump-dom"], &format!("{base}/"));
    assert!(dom.contains("data-ready=\"1\""), "{dom}");
    assert!(
        dom.contains("<span class=\"failed\">failed</span> <strong>backup</strong>"),
        "the failure is not on the page:\n{dom}"
    );

    assert_eq!(d.stop(), 0);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening after SIGTERM"
    );
}

/// Polls `/healthz` until it answers `code` (within 60 s: a check is reused for 10 s).
fn wait_for_health(base: &str, code: u16, d: &Daemon) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = curl(&format!("{base}/healthz"), &[]);
        if h.code == code {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz still answers {}:\n{}\n{}",
            h.code,
            h.body,
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A self-signed certificate for `localhost` and its key, as PEM files.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let cert = params.self_signed(&key).unwrap();
    let (crt, pk) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&pk, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&pk, std::fs::Permissions::from_mode(0o600)).unwrap();
    (crt, pk)
}

#[test]
fn daemon_listener_basic_auth_tls_and_a_taken_port() {
    use std::os::unix::fs::PermissionsExt;
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let port = free_port();
    let pw = s.path().join("password");
    std::fs::write(&pw, "open sesame\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (crt, key) = self_signed(s.path());
    let config = |listen: &str, extra: &str| {
        format!(
            "[[repository]]\nname = \"r\"\nurl = \"{}\"\n\n[health]\ncheck_archiving = false\n\n\
             [daemon]\nlisten = \"{listen}\"\nstate_dir = \"{}\"\n{extra}\n\n\
             [[schedule]]\njob = \"check\"\ncron = \"0 0 1 1 *\"\n",
            s.repo().display(),
            s.path().join("state").display()
        )
    };
    let cfg = s.path().join("auth.toml");
    let auth = format!("user = \"ops\"\npassword_file = \"{}\"\n", pw.display());
    std::fs::write(&cfg, config(&format!(":{port}"), &auth)).unwrap();

    // A password file others may read is refused: the daemon does not start.
    let out = Daemon::command(&s, &cfg, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0644") && err.contains("chmod 600"), "{err}");
    assert!(!err.contains("open sesame"), "{err}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();

    // `:PORT` listens on 127.0.0.1; every path needs the credentials.
    let d = Daemon::start(&s, &cfg, port, &[]);
    let base = format!("http://127.0.0.1:{port}");
    for path in [
        "/",
        "/metrics",
        "/healthz",
        "/api/status",
        "/api/schedules",
        "/nope",
    ] {
        let r = curl(&format!("{base}{path}"), &[]);
        assert_eq!(r.code, 401, "{path}: {}", r.body);
        assert!(
            r.headers
                .to_ascii_lowercase()
                .contains("www-authenticate: basic realm=\"pgkeep\""),
            "{}",
            r.headers
        );
        let wrong = curl(&format!("{base}{path}"), &["-u", "ops:open sesam"]);
        assert_eq!(wrong.code, 401, "{path}");
        let wrong = curl(&format!("{base}{path}"), &["-u", "root:open sesame"]);
        assert_eq!(wrong.code, 401, "{path}");
    }
    let ok = curl(&format!("{base}/api/status"), &["-u", "ops:open sesame"]);
    assert_eq!(ok.code, 200, "{}", ok.body);
    assert_eq!(ok.json()[0]["cluster"], "main");
    let m = curl(&format!("{base}/metrics"), &["-u", "ops:open sesame"]);
    assert_eq!(m.code, 200);
    promtool(&m.body);
    assert!(!m.body.contains("sesame") && !ok.body.contains("sesame"));
    let h = curl(&format!("{base}/healthz"), &["-u", "ops:open sesame"]);
    assert_eq!(h.code, 200, "{}", h.body);

    // The port is taken: a second daemon fails at start, naming the address.
    let out = Daemon::command(&s, &cfg, &[]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("cannot listen"),
        "{err}"
    );
    assert_eq!(d.stop(), 0);

    // HTTPS, with the password from the environment.
    let port = free_port();
    let tls = format!(
        "user = \"ops\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        crt.display(),
        key.display()
    );
    std::fs::write(&cfg, config(&format!("127.0.0.1:{port}"), &tls)).unwrap();
    // A file naming a key must be private (the configuration loader's rule).
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let d = Daemon::start(&s, &cfg, port, &[("PGKEEP_DAEMON_PASSWORD", "from-env")]);
    let url = format!("https://localhost:{port}/healthz");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let cacert = crt.to_str().unwrap();
    let r = curl(
        &url,
        &[
            "--resolve",
            &resolve,
            "--cacert",
            cacert,
            "-u",
            "ops:from-env",
        ],
    );
    assert_eq!(r.code, 200, "{}\n{}", r.body, d.log());
    let r = curl(&url, &["--resolve", &resolve, "--cacert", cacert]);
    assert_eq!(r.code, 401);
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/healthz"))
        .output()
        .unwrap();
    assert!(!plain.status.success() || plain.stdout.is_empty());
    assert_eq!(d.stop(), 0);
}
