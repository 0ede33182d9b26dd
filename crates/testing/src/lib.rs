//! pgkeep-testing
pub mod cluster;
pub use cluster::{Cluster, ClusterBuilder, StopMode};
pub mod azure;
pub mod fault_proxy;
pub mod s3;
