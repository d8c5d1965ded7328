//! One file per subcommand.

pub mod bench;
pub mod generate;
pub mod score;
pub mod tiny;
