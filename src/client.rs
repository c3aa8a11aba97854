//! A typed client for the VM API, shared by `metaldctl` and the tests.

use std::time::Duration;

use connectrpc::client::{ClientConfig, HttpClient};
use connectrpc::{CodecFormat, ConnectError, Protocol};

use crate::pb::vmprovisioner::v1::VmServiceClient;

/// Wire protocol and encoding a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireProtocol {
    /// Connect with binary protobuf over HTTP/1.1.
    ConnectProto,
    /// Connect with JSON over HTTP/1.1.
    ConnectJson,
    /// gRPC over HTTP/2 (h2c).
    Grpc,
    /// gRPC-Web over HTTP/1.1.
    GrpcWeb,
}

impl WireProtocol {
    pub const ALL: [WireProtocol; 4] =
        [WireProtocol::ConnectProto, WireProtocol::ConnectJson, WireProtocol::Grpc, WireProtocol::GrpcWeb];
}

pub type VmClient = VmServiceClient<HttpClient>;

/// Builds a client for `endpoint` (e.g. `http://127.0.0.1:8080`) that sends
/// `token` as its bearer credential.
pub fn vm_client(
    endpoint: &str,
    token: &str,
    protocol: WireProtocol,
    timeout: Duration,
) -> Result<VmClient, ConnectError> {
    client(endpoint, token, protocol, Some(timeout))
}

/// [`vm_client`] without a default deadline, for calls that last as long
/// as the caller wants (a followed `StreamConsole`).
pub fn vm_stream_client(endpoint: &str, token: &str, protocol: WireProtocol) -> Result<VmClient, ConnectError> {
    client(endpoint, token, protocol, None)
}

fn client(
    endpoint: &str,
    token: &str,
    protocol: WireProtocol,
    timeout: Option<Duration>,
) -> Result<VmClient, ConnectError> {
    let uri: http::Uri =
        endpoint.parse().map_err(|e| ConnectError::invalid_argument(format!("endpoint {endpoint:?}: {e}")))?;
    let transport = match protocol {
        WireProtocol::Grpc => HttpClient::plaintext_http2_only(),
        _ => HttpClient::plaintext(),
    };
    let mut config = ClientConfig::new(uri);
    if let Some(t) = timeout {
        config = config.with_default_timeout(t);
    }
    if !token.is_empty() {
        config = config.with_default_header("authorization", format!("Bearer {token}"));
    }
    config = match protocol {
        WireProtocol::ConnectProto => config.with_protocol(Protocol::Connect).with_codec_format(CodecFormat::Proto),
        WireProtocol::ConnectJson => config.with_protocol(Protocol::Connect).with_codec_format(CodecFormat::Json),
        WireProtocol::Grpc => config.with_protocol(Protocol::Grpc).with_codec_format(CodecFormat::Proto),
        WireProtocol::GrpcWeb => config.with_protocol(Protocol::GrpcWeb).with_codec_format(CodecFormat::Proto),
    };
    Ok(VmServiceClient::new(transport, config))
}
