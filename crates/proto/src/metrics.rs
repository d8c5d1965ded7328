//! The `GET /metrics` endpoint every role serves: one Prometheus scrape function behind a small
//! HTTP server, so the roles differ only in what they measure.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

/// Refreshes gauges and renders the metrics as OpenMetrics text; shared by the HTTP handler,
/// in-process readers and tests.
pub type Scrape = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener` until `shutdown` completes: the scrape's text, or a 500
/// with its error.
pub async fn serve_metrics(listener: TcpListener, scrape: Scrape, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let handler = move || {
        let scrape = scrape.clone();
        async move {
            match scrape() {
                Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
            }
        }
    };
    axum::serve(listener, Router::new().route("/metrics", get(handler))).with_graceful_shutdown(shutdown).await
}
