//! The targets, by the crate whose parsers they drive.

pub mod core;
pub mod pg;
pub mod repo;

/// Mutation tokens for JSON inputs.
pub const JSON_TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"4294967295",
    b"4294967296",
    b"18446744073709551615",
    b"1e999",
    b"\"\\u0000\"",
    b"[[[[[[[[[[[[[[[[",
    b"\"size\":",
    b"\"blobs\":",
    b"\"raw_length\":",
    b"\"offset\":",
    b"\"length\":",
    b"\"m_kib\":",
    b"\"kind\":\"physical\"",
    b"\"kind\":\"dump\"",
    b"\"format\":",
    b"\"files\":",
];

/// Mutation tokens for the TOML configuration file.
pub const TOML_TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"=",
    b"\"",
    b"'''",
    b"\"\"\"",
    b"\n",
    b"#",
    b".",
    b"{",
    b"}",
    b"[[repository]]\n",
    b"[[cluster]]\n",
    b"[options]\n",
    b"[health]\n",
    b"[notify]\n",
    b"url = ",
    b"name = ",
    b"schedule = ",
    b"keep_last = ",
    b"1979-05-27T07:32:00Z",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"inf",
    b"nan",
];

/// Mutation tokens for backup_label text.
pub const LABEL_TOKENS: &[&[u8]] = &[
    b"START WAL LOCATION: ",
    b"CHECKPOINT LOCATION: ",
    b"START TIMELINE: ",
    b"BACKUP FROM: ",
    b"LABEL: ",
    b" (file ",
    b")",
    b"\n",
    b"0/",
    b"FFFFFFFF/FFFFFFFF",
    b"4294967296",
];
