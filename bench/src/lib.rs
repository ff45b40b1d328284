//! The library behind `driftsync-bench`: clients of the five systems, the workloads (cross-instance
//! fan-out among them), the bare
//! relay (the floor), `/proc` sampling, statistics and the report. See the binary's documentation and `bench/run-all.sh`.

pub mod b4;
pub mod clients;
pub mod cross;
pub mod inbox;
pub mod load;
pub mod procfs;
pub mod relay;
pub mod report;
pub mod stats;
pub mod writers;
