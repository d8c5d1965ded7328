//! Process-wide setup shared by every command: logging, device and dtype selection.

use anyhow::{Result, bail};
use candle_core::{DType, Device};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); colours only on a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Log files (deploy/local/run.sh) and `kubectl logs` would otherwise be full of escape codes.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !no_color;
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).with_target(false).try_init();
}

/// Device and dtype options every model-running command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `cpu` or `cuda[:N]`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl DeviceArgs {
    /// The candle device named by `--device`.
    pub fn device(&self) -> Result<Device> {
        match self.device.as_str() {
            "cpu" => Ok(Device::Cpu),
            s if s.starts_with("cuda") => {
                let ordinal = match s.strip_prefix("cuda:") {
                    Some(n) => n.parse::<usize>().map_err(|_| anyhow::anyhow!("--device {s}: expected cuda:N with N a GPU index"))?,
                    None => 0,
                };
                Ok(Device::new_cuda(ordinal)?)
            }
            other => bail!("--device {other}: expected cpu or cuda[:N]"),
        }
    }

    /// The dtype named by `--dtype`.
    pub fn dtype(&self) -> Result<DType> {
        match self.dtype.as_str() {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            "f16" => Ok(DType::F16),
            other => bail!("--dtype {other}: expected f32, bf16 or f16"),
        }
    }
}
