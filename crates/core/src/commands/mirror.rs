//! `cluster.copy_to`: repositories that `backup`, `dump` and `archive-push` write to as well
//! as the cluster's own. A backup or dump is copied there (only the blobs each lacks, as
//! `copy` does) before the command reports success; a WAL file is pushed to every one before
//! `archive-push` exits 0, so PostgreSQL recycles a segment only when every repository holds
//! it. A failure names the repository and leaves what the others stored in place (the
//! command's rerun, or PostgreSQL's retry of the segment, completes it).

use std::path::Path;

use crate::commands::archive::{push_content, WalFileContent};
use crate::commands::copy::{self, CopyOptions, CopySelection};
use crate::config::Env;
use crate::context::Context;
use crate::error::{Error, Result};
use pgkeep_repo::Repository;

/// The `copy_to` repositories of the cluster, opened (names with them).
pub async fn open_copies(ctx: &Context) -> Result<Vec<(String, Repository)>> {
    let env = Env::from_process();
    let mut out = Vec::new();
    for name in &ctx.settings.cluster.copy_to {
        let repo = ctx
            .open_other_repository(name, &env)
            .await
            .map_err(|e| in_copy(name, "opening it", e))?;
        out.push((name.clone(), repo));
    }
    Ok(out)
}

/// `e` as a failure of the copy repository `name`, kind kept.
fn in_copy(name: &str, what: &str, e: Error) -> Error {
    let (msg, hint) = crate::history::split_message(&e.to_string());
    let message = format!("copy repository {name:?} (cluster.copy_to): {what}: {msg}");
    match hint {
        Some(h) => Error::with_hint(e.kind(), message, h),
        None => Error::new(e.kind(), message),
    }
}

/// Copies backup or dump `id` of `cluster` from `source` to every `copy_to` repository.
pub async fn copy_new_backup(ctx: &Context, source: &Repository, id: &str) -> Result<()> {
    for (name, target) in open_copies(ctx).await? {
        let opts = CopyOptions {
            cluster: ctx.settings.cluster.name.clone(),
            selection: CopySelection::Ids(vec![id.to_string()]),
            wal: false,
            threads: ctx.settings.threads,
            target_location: target.storage().location(),
        };
        copy::copy(source, &target, &opts).await.map_err(|e| {
            in_copy(
                &name,
                &format!("{id} is stored in the cluster's repository, but copying it here failed"),
                e,
            )
        })?;
    }
    Ok(())
}

/// Pushes the WAL file at `path` (already read) to every repository of `copies`.
pub async fn push_to_copies(
    copies: &[(String, Repository)],
    cluster: &str,
    path: &Path,
    content: &WalFileContent,
) -> Result<()> {
    for (name, repo) in copies {
        push_content(repo, cluster, path, content.clone())
            .await
            .map_err(|e| {
                in_copy(
                    name,
                    &format!(
                        "{} is stored in the cluster's repository but not here; PostgreSQL will retry it",
                        path.display()
                    ),
                    e,
                )
            })?;
    }
    Ok(())
}
