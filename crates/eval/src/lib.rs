//! Evaluation and diagnostics of medical VLMs, reproducing arXiv 2603.01301's: greedy Acc@1
//! against unbiased Pass@k per dataset and modality, the support-gap report behind the
//! boundary-aware recipe, Pass@k curves, the figures of a training run (`run_plots`), and linear /
//! kNN probes of the frozen vision tower.

pub mod augment;
pub mod error;
pub mod eval_file;
pub mod features;
pub mod judge;
pub mod knn;
pub mod linear;
pub mod metrics;
pub mod outputs;
pub mod plot;
pub mod probe;
pub mod probe_data;
pub mod report;
pub mod run;
pub mod run_charts;
pub mod run_log;
pub mod run_plots;
pub mod samples;

pub use error::{EvalError, Result};
pub use eval_file::EvalFile;
pub use features::{FeatureExtractor, Pooling};
pub use judge::{judge, rejudge};
pub use knn::Vote;
pub use linear::LinearConfig;
pub use metrics::{GroupMetrics, Metrics, compute_metrics};
pub use outputs::{Outputs, write_outputs};
pub use probe::{ProbeConfig, ProbeMethod, ProbeReport, run_probe};
pub use probe_data::ProbeData;
pub use report::{SupportThresholds, Regime};
pub use run::{EvalConfig, evaluate};
pub use run_plots::{PlotReport, plot_run};
pub use samples::{ItemSamples, Judged, SamplesWriter, read_samples};
pub use medrl_vqa::{VqaRecord, read_records};
