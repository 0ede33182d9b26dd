//! pgkeep-testing
pub mod cluster;
pub use cluster::{Cluster, ClusterBuilder, StopMode};
