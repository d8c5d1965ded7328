//! One file per subcommand.

pub mod bench;
pub mod bench_coordinator;
pub mod bench_parity;
pub mod config;
pub mod data;
pub mod eval;
pub mod generate;
pub mod learner;
pub mod plot;
pub mod probe;
pub mod roles;
pub mod score;
pub mod tiny;
pub mod train;
