//! Opening storage from URLs and options (RELIABILITY rows 25 and 27).

use pgkeep_storage::{open_storage, open_storage_unwrapped, ErrorKind, StorageOptions};

fn err(url: &str) -> pgkeep_storage::StorageError {
    match open_storage_unwrapped(url, &StorageOptions::default()) {
        Ok(s) => panic!("{url} was accepted as {}", s.location()),
        Err(e) => e,
    }
}

#[tokio::test]
async fn plain_paths_and_file_urls_are_local() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_storage(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
    assert_eq!(s.location(), dir.path().display().to_string());
    s.put("a", bytes::Bytes::from_static(b"1")).await.unwrap();
    let url = format!("file://{}", dir.path().display());
    let s2 = open_storage(&url, &StorageOptions::default()).unwrap();
    assert_eq!(&s2.get("a").await.unwrap()[..], b"1");
    // A path with a colon is still a path.
    let odd = dir.path().join("we:ird");
    let s3 = open_storage(odd.to_str().unwrap(), &StorageOptions::default()).unwrap();
    assert!(s3.location().ends_with("we:ird"));
}

#[test]
fn remote_file_url_is_refused() {
    let e = err("file://otherhost/srv/repo");
    assert_eq!(e.kind, ErrorKind::Config, "{e}");
}

#[test]
fn credentials_in_urls_are_refused_without_echoing_them() {
    let secret = "wJalrXUtnFEMI-K7MDENG-CANARY";
    for url in [
        format!("s3://AKIAEXAMPLE:{secret}@bucket/prefix"),
        format!("s3://{secret}@bucket/prefix"),
        format!("az://container/p?sv=2022-11-02&sig={secret}"),
        format!("s3://bucket/p?X-Amz-Signature={secret}"),
        format!("gs://bucket/p?access_token={secret}"),
        format!("s3://bucket/p?secret_access_key={secret}"),
    ] {
        let e = err(&url);
        assert_eq!(e.kind, ErrorKind::Config, "{url}: {e}");
        assert!(!e.message.contains(secret), "secret leaked: {e}");
        assert!(
            !format!("{e:?}").contains(secret),
            "secret leaked in Debug: {e:?}"
        );
        assert!(e.message.contains("environment"), "no hint: {e}");
    }
}

#[test]
fn unknown_scheme_names_url_and_accepted_schemes() {
    let e = err("ftp://host/repo");
    assert_eq!(e.kind, ErrorKind::Config);
    assert!(e.message.contains("ftp://host/repo"), "{e}");
    for s in ["s3://", "az://", "gs://", "file://"] {
        assert!(e.message.contains(s), "{e}");
    }
    let e = err("sftp://user:pw@host/repo");
    assert!(!e.message.contains("pw"), "{e}");
}

#[test]
fn malformed_object_urls() {
    for url in [
        "s3:///prefix",
        "s3://bucket:9000/p",
        "s3://bucket/a//b",
        "gs://b/p?region=x",
    ] {
        let e = err(url);
        assert_eq!(e.kind, ErrorKind::Config, "{url}: {e}");
    }
    assert_eq!(err("").kind, ErrorKind::Config);
}

/// GCS: the builder is configured from URL and environment without touching the network.
#[test]
fn gcs_builds_offline() {
    let s = open_storage_unwrapped("gs://my-bucket/some/prefix", &StorageOptions::default())
        .expect("gs:// storage");
    assert_eq!(s.location(), "gs://my-bucket/some/prefix");
    let s = open_storage_unwrapped("gs://my-bucket", &StorageOptions::default()).unwrap();
    assert_eq!(s.location(), "gs://my-bucket");
}

#[test]
fn s3_and_azure_build_offline() {
    let opts = StorageOptions {
        endpoint: Some("http://127.0.0.1:1".into()),
        region: Some("eu-west-1".into()),
        force_path_style: Some(true),
        allow_http: true,
        ..StorageOptions::default()
    };
    let s = open_storage("s3://b/p/q/", &opts).unwrap();
    assert_eq!(s.location(), "s3://b/p/q");
    let az = StorageOptions {
        azure_use_emulator: true,
        ..StorageOptions::default()
    };
    let s = open_storage("az://c/p", &az).unwrap();
    assert_eq!(s.location(), "az://c/p");
}

/// Connection refused is Temporary (worth retrying), and says where.
#[tokio::test]
async fn unreachable_endpoint_is_temporary() {
    std::env::set_var("AWS_ACCESS_KEY_ID", "test-id");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret-not-in-messages");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = StorageOptions {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".into()),
        allow_http: true,
        retry_max_attempts: 1,
        ..StorageOptions::default()
    };
    let s = open_storage("s3://bucket/p", &opts).unwrap();
    let e = s.get("k").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Temporary, "{e}");
    assert!(e.message.contains("s3://bucket/p/k"), "{e}");
    assert!(!e.message.contains("test-secret-not-in-messages"), "{e}");
}

#[test]
fn options_deserialize_and_reject_unknown_keys() {
    let o: StorageOptions = toml::from_str(
        "endpoint = \"http://127.0.0.1:8333\"\nregion = \"x\"\nforce_path_style = true\nallow_http = true\n",
    )
    .unwrap();
    assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
    assert_eq!(o.retry_max_attempts, 5, "defaults fill the rest");
    let e = toml::from_str::<StorageOptions>("endpoint = \"x\"\nsecret_key = \"y\"\n").unwrap_err();
    assert!(e.to_string().contains("secret_key"), "{e}");
    let o: StorageOptions = serde_json::from_str("{}").unwrap();
    assert_eq!(o, StorageOptions::default());
}
