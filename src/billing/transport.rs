//! How the sender reaches the billing service: one [`Request`] per call,
//! the [`Transport`] it goes through (the ConnectRPC client, the mock-mode
//! logger, or a test double) and [`SendError`]. Imports the leaves only.

use std::sync::Arc;

use async_trait::async_trait;
use connectrpc::client::{ClientConfig, HttpClient};
use connectrpc::{CodecFormat, Protocol};
use tracing::{debug, info};

use super::codec::Record;
use super::config::BillingConfig;
use super::error::{BillingError, SpoolError};
use crate::pb::billing::v1 as pb;

/// One call to the billing service.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Batch { vm: Arc<str>, customer: Arc<str>, samples: Vec<Record> },
    Started { vm: Arc<str>, customer: Arc<str>, ts: i64 },
    Stopped { vm: Arc<str>, ts: i64 },
    Gap { vm: Arc<str>, last_sent: i64, resume: i64 },
    Heartbeat { instance: String, vms: Vec<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("billing call failed")]
    Rpc(#[from] connectrpc::ConnectError),
    #[error("billing service did not accept the call: {0}")]
    Refused(String),
    #[error("reading the spool")]
    Spool(#[from] SpoolError),
    #[error("spool read task: {0}")]
    Task(String),
}

impl SendError {
    /// The billing service could not be reached (as opposed to a call it
    /// answered with an error): the whole endpoint backs off.
    pub fn is_outage(&self) -> bool {
        use connectrpc::ErrorCode;
        matches!(self, SendError::Rpc(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::DeadlineExceeded))
    }
}

/// Where requests go: the Connect client, the mock logger, or a test double.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn call(&self, req: &Request) -> Result<(), SendError>;
}

/// The ConnectRPC `billing.v1.BillingService` client.
pub struct ConnectTransport {
    client: pb::BillingServiceClient<HttpClient>,
}

fn timestamp(ns: i64) -> buffa_types::google::protobuf::Timestamp {
    buffa_types::google::protobuf::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: i32::try_from(ns.rem_euclid(1_000_000_000)).unwrap_or(0),
        ..Default::default()
    }
}

fn ok(success: bool, message: &str) -> Result<(), SendError> {
    if success {
        Ok(())
    } else {
        Err(SendError::Refused(if message.is_empty() { "success=false".into() } else { message.into() }))
    }
}

#[async_trait]
impl Transport for ConnectTransport {
    async fn call(&self, req: &Request) -> Result<(), SendError> {
        let c = &self.client;
        match req {
            Request::Batch { vm, customer, samples } => {
                let metrics = samples
                    .iter()
                    .map(|s| pb::VMMetrics {
                        timestamp: timestamp(s.ts_ns).into(),
                        cpu_time_nanos: s.v[0],
                        memory_usage_bytes: s.v[1],
                        disk_read_bytes: s.v[2],
                        disk_write_bytes: s.v[3],
                        network_rx_bytes: s.v[4],
                        network_tx_bytes: s.v[5],
                        ..Default::default()
                    })
                    .collect();
                let r = c
                    .send_metrics_batch(pb::SendMetricsBatchRequest {
                        vm_id: vm.to_string(),
                        customer_id: customer.to_string(),
                        metrics,
                        ..Default::default()
                    })
                    .await?
                    .into_owned();
                ok(r.success, &r.message)
            }
            Request::Started { vm, customer, ts } => {
                let r = c
                    .notify_vm_started(pb::NotifyVmStartedRequest {
                        vm_id: vm.to_string(),
                        customer_id: customer.to_string(),
                        start_time: *ts,
                        ..Default::default()
                    })
                    .await?
                    .into_owned();
                ok(r.success, "")
            }
            Request::Stopped { vm, ts } => {
                let r = c
                    .notify_vm_stopped(pb::NotifyVmStoppedRequest {
                        vm_id: vm.to_string(),
                        stop_time: *ts,
                        ..Default::default()
                    })
                    .await?
                    .into_owned();
                ok(r.success, "")
            }
            Request::Gap { vm, last_sent, resume } => {
                let r = c
                    .notify_possible_gap(pb::NotifyPossibleGapRequest {
                        vm_id: vm.to_string(),
                        last_sent: *last_sent,
                        resume_time: *resume,
                        ..Default::default()
                    })
                    .await?
                    .into_owned();
                ok(r.success, "")
            }
            Request::Heartbeat { instance, vms } => {
                let r = c
                    .send_heartbeat(pb::SendHeartbeatRequest {
                        instance_id: instance.clone(),
                        active_vms: vms.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_owned();
                ok(r.success, "")
            }
        }
    }
}

/// `UNKEY_METALD_BILLING_MOCK_MODE`: logs what would be sent, acknowledges.
pub struct MockTransport;

#[async_trait]
impl Transport for MockTransport {
    async fn call(&self, req: &Request) -> Result<(), SendError> {
        match req {
            Request::Batch { vm, customer, samples } => info!(
                vm_id = %vm,
                customer_id = %customer,
                samples = samples.len(),
                first_ts = samples.first().map(|s| s.ts_ns).unwrap_or(0),
                last_cpu_ns = samples.last().map(|s| s.v[0]).unwrap_or(0),
                "billing mock: metrics batch"
            ),
            Request::Heartbeat { vms, .. } => debug!(vms = vms.len(), "billing mock: heartbeat"),
            other => info!(request = ?other, "billing mock: notice"),
        }
        Ok(())
    }
}

/// The transport `cfg` asks for.
pub fn transport(cfg: &BillingConfig) -> Result<Arc<dyn Transport>, BillingError> {
    if cfg.mock_mode {
        return Ok(Arc::new(MockTransport));
    }
    let uri: http::Uri = cfg.endpoint.parse().map_err(|e: http::uri::InvalidUri| BillingError::Endpoint {
        endpoint: cfg.endpoint.clone(),
        message: e.to_string(),
    })?;
    let config = ClientConfig::new(uri)
        .with_default_timeout(cfg.rpc_timeout)
        .with_protocol(Protocol::Connect)
        .with_codec_format(CodecFormat::Proto);
    Ok(Arc::new(ConnectTransport { client: pb::BillingServiceClient::new(HttpClient::plaintext(), config) }))
}
