//! OTLP/protobuf encoding of spans, written by hand field for field as
//! `opentelemetry-proto`'s conversion does it (a test in `spans` decodes
//! these bytes with `opentelemetry-proto` and compares): protobuf field
//! helpers, attribute values, a `SpanData` as `ScopeSpans.spans`, the RPC
//! [`ServerSpan`] from its per-method template, the resource, and the
//! framing of an `ExportTraceServiceRequest` around encoded spans.
//!
//! Hand-written because the generated types take an owned copy of every
//! string and id per span (see `spans` for the measured cost); this module
//! writes straight into the batch buffer.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;
use prost::encoding::{WireType, encode_key, encode_varint};

pub(super) fn len_field(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

/// A proto3 `bytes`/`string` field: absent when empty.
pub(super) fn bytes_field(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    if !bytes.is_empty() {
        len_field(buf, tag, bytes);
    }
}

/// A proto3 varint field: absent when zero.
pub(super) fn varint_field(buf: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

pub(super) fn fixed64_field(buf: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

pub(super) fn fixed32_field(buf: &mut Vec<u8>, tag: u32, v: u32) {
    if v != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, buf);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// Field `tag` as an embedded message written by `body` (present even when
/// empty, as `Some(message)` is).
pub(super) fn message(buf: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) {
    encode_key(tag, WireType::LengthDelimited, buf);
    // One byte for the length, widened after the body if it is 128 or more.
    let at = buf.len();
    buf.push(0);
    body(buf);
    let len = buf.len() - at - 1;
    match u8::try_from(len) {
        Ok(short) if short < 0x80 => buf[at] = short,
        _ => {
            // Rare (only nested messages reach here; spans are framed by
            // `framed`): shift the body right by the extra length bytes.
            let mut prefix = Vec::with_capacity(10);
            encode_varint(len as u64, &mut prefix);
            let extra = prefix.len() - 1;
            buf.resize(buf.len() + extra, 0);
            buf.copy_within(at + 1..at + 1 + len, at + 1 + extra);
            buf[at..at + prefix.len()].copy_from_slice(&prefix);
        }
    }
}

/// Appends `body` as length-delimited field `tag` (a `ScopeSpans.spans`
/// entry): the body is encoded apart, so its length is known and it is
/// copied once, with no widening of a length placeholder.
pub(super) fn framed(buf: &mut Vec<u8>, tag: u32, body: &[u8]) {
    buf.reserve(body.len() + 4);
    len_field(buf, tag, body);
}

pub(super) fn any_value(buf: &mut Vec<u8>, v: &Value) {
    // `AnyValue.value` is a oneof: set means present, even at its default.
    match v {
        Value::String(s) => len_field(buf, 1, s.as_str().as_bytes()),
        Value::Bool(b) => {
            encode_key(2, WireType::Varint, buf);
            encode_varint(u64::from(*b), buf);
        }
        Value::I64(i) => {
            encode_key(3, WireType::Varint, buf);
            encode_varint(i64::cast_unsigned(*i), buf);
        }
        Value::F64(f) => {
            encode_key(4, WireType::SixtyFourBit, buf);
            buf.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Array(a) => message(buf, 5, |buf| {
            let each = |buf: &mut Vec<u8>, v: Value| message(buf, 1, |buf| any_value(buf, &v));
            match a {
                Array::Bool(v) => v.iter().for_each(|x| each(buf, Value::Bool(*x))),
                Array::I64(v) => v.iter().for_each(|x| each(buf, Value::I64(*x))),
                Array::F64(v) => v.iter().for_each(|x| each(buf, Value::F64(*x))),
                Array::String(v) => v.iter().for_each(|x| each(buf, Value::String(x.clone()))),
                _ => {}
            }
        }),
        // A kind this encoder does not know: an empty value, not a panic.
        _ => {}
    }
}

pub(super) fn key_value(buf: &mut Vec<u8>, tag: u32, kv: &KeyValue) {
    pair(buf, tag, kv.key.as_str(), &kv.value);
}

/// A `KeyValue` message.
pub(super) fn pair(buf: &mut Vec<u8>, tag: u32, key: &str, value: &Value) {
    message(buf, tag, |buf| {
        bytes_field(buf, 1, key.as_bytes());
        message(buf, 2, |buf| any_value(buf, value));
    });
}

/// A `KeyValue` message with a string value (as [`pair`] writes
/// `Value::String`, without building one).
pub(super) fn str_pair(buf: &mut Vec<u8>, tag: u32, key: &str, value: &str) {
    message(buf, tag, |buf| {
        bytes_field(buf, 1, key.as_bytes());
        message(buf, 2, |buf| len_field(buf, 1, value.as_bytes()));
    });
}

pub(super) fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `Span.flags`: the W3C trace flags, and whether the parent is remote.
pub(super) fn flags(parent_is_remote: bool, trace_flags: TraceFlags) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    u32::from(trace_flags.to_u8()) | HAS_IS_REMOTE | if parent_is_remote { IS_REMOTE } else { 0 }
}

pub(super) fn kind(k: &SpanKind) -> u64 {
    match k {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

/// Appends `s` as one `ScopeSpans.spans` entry (field 2).
#[cfg(test)]
pub(super) fn encode_span(buf: &mut Vec<u8>, s: &SpanData) {
    let mut body = Vec::new();
    encode_span_body(&mut body, s);
    framed(buf, 2, &body);
}

/// `Span` fields 1–4: trace id, span id, trace state, parent span id.
pub(super) fn span_ids(buf: &mut Vec<u8>, sc: &SpanContext, parent: SpanId) {
    bytes_field(buf, 1, &sc.trace_id().to_bytes());
    bytes_field(buf, 2, &sc.span_id().to_bytes());
    bytes_field(buf, 3, sc.trace_state().header().as_bytes());
    if parent != SpanId::INVALID {
        bytes_field(buf, 4, &parent.to_bytes());
    }
}

/// `Span` fields 15 and 16: the status (code 0 unset, 1 ok, 2 error, with
/// its description) and the flags.
pub(super) fn span_status_and_flags(buf: &mut Vec<u8>, code: u64, description: &str, flags: u32) {
    message(buf, 15, |buf| {
        bytes_field(buf, 2, description.as_bytes());
        varint_field(buf, 3, code);
    });
    fixed32_field(buf, 16, flags);
}

/// The fields of the `Span` message of `s`.
pub(super) fn encode_span_body(buf: &mut Vec<u8>, s: &SpanData) {
    span_ids(buf, &s.span_context, s.parent_span_id);
    bytes_field(buf, 5, s.name.as_bytes());
    varint_field(buf, 6, kind(&s.span_kind));
    fixed64_field(buf, 7, nanos(s.start_time));
    fixed64_field(buf, 8, nanos(s.end_time));
    s.attributes.iter().for_each(|kv| key_value(buf, 9, kv));
    varint_field(buf, 10, u64::from(s.dropped_attributes_count));
    for e in s.events.iter() {
        message(buf, 11, |buf| {
            fixed64_field(buf, 1, nanos(e.timestamp));
            bytes_field(buf, 2, e.name.as_bytes());
            e.attributes.iter().for_each(|kv| key_value(buf, 3, kv));
            varint_field(buf, 4, u64::from(e.dropped_attributes_count));
        });
    }
    varint_field(buf, 12, u64::from(s.events.dropped_count));
    for l in s.links.iter() {
        message(buf, 13, |buf| {
            bytes_field(buf, 1, &l.span_context.trace_id().to_bytes());
            bytes_field(buf, 2, &l.span_context.span_id().to_bytes());
            bytes_field(buf, 3, l.span_context.trace_state().header().as_bytes());
            l.attributes.iter().for_each(|kv| key_value(buf, 4, kv));
            varint_field(buf, 5, u64::from(l.dropped_attributes_count));
            fixed32_field(buf, 6, flags(l.span_context.is_remote(), l.span_context.trace_flags()));
        });
    }
    varint_field(buf, 14, u64::from(s.links.dropped_count));
    let (code, description) = match &s.status {
        Status::Unset => (0, ""),
        Status::Ok => (1, ""),
        Status::Error { description } => (2, description.as_ref()),
    };
    span_status_and_flags(buf, code, description, flags(s.parent_span_is_remote, s.span_context.trace_flags()));
}

// ---- RPC server spans --------------------------------------------------

/// The part of an RPC server span that is the same for every call of one
/// method over one protocol, encoded once: name, kind and the static
/// attributes, in that order (see [`ServerSpan`]).
pub fn server_span_head(name: &str, kind_: &SpanKind, attributes: &[KeyValue]) -> Vec<u8> {
    let mut buf = Vec::new();
    bytes_field(&mut buf, 5, name.as_bytes());
    varint_field(&mut buf, 6, kind(kind_));
    attributes.iter().for_each(|kv| key_value(&mut buf, 9, kv));
    buf
}

/// An RPC's server span as `rpc::RpcTelemetry` records it, without the
/// SDK's span object: the SDK builds a span builder, a span with a mutex, a
/// `SpanData` and a scope clone for every span, which the telemetry bench
/// measured at about a quarter of telemetry's cost per GetVmInfo; the name,
/// kind and most attributes of this span are the same for every call of a
/// method, so they come pre-encoded in `head`. Encoded, it decodes to the
/// same `Span` message as the SDK span it stands for (tested below).
pub struct ServerSpan<'a> {
    /// Trace id, span id, flags (sampled) and trace state of the span.
    pub context: &'a SpanContext,
    /// The parent's span context (an incoming `traceparent`), if any.
    pub parent: Option<&'a SpanContext>,
    /// From [`server_span_head`].
    pub head: &'a [u8],
    pub start: SystemTime,
    pub end: SystemTime,
    /// Attributes after the static ones, in this order.
    pub vm_id: Option<&'a str>,
    pub grpc_status_code: Option<i64>,
    pub connect_error_code: Option<&'static str>,
    /// The span's status: Unset, or Error with this description.
    pub error: Option<&'a str>,
}

impl ServerSpan<'_> {
    pub(super) fn exported(&self) -> bool {
        self.context.is_sampled() || self.error.is_some()
    }

    /// The fields of its `Span` message.
    pub(super) fn encode_body(&self, buf: &mut Vec<u8>) {
        span_ids(buf, self.context, self.parent.map_or(SpanId::INVALID, SpanContext::span_id));
        buf.extend_from_slice(self.head);
        fixed64_field(buf, 7, nanos(self.start));
        fixed64_field(buf, 8, nanos(self.end));
        if let Some(id) = self.vm_id {
            str_pair(buf, 9, "vm_id", id);
        }
        if let Some(code) = self.grpc_status_code {
            pair(buf, 9, "rpc.grpc.status_code", &Value::I64(code));
        }
        if let Some(code) = self.connect_error_code {
            str_pair(buf, 9, "rpc.connect_rpc.error_code", code);
        }
        let parent_is_remote = self.parent.is_some_and(SpanContext::is_remote);
        let flags = flags(parent_is_remote, self.context.trace_flags());
        match self.error {
            Some(description) => span_status_and_flags(buf, 2, description, flags),
            None => span_status_and_flags(buf, 0, "", flags),
        }
    }
}

/// `ResourceSpans.resource` and `.schema_url` of `resource`.
pub(super) fn encode_resource(resource: &Resource) -> Vec<u8> {
    let mut buf = Vec::new();
    message(&mut buf, 1, |buf| {
        resource.iter().for_each(|(k, v)| pair(buf, 1, k.as_str(), v));
    });
    bytes_field(&mut buf, 3, resource.schema_url().unwrap_or_default().as_bytes());
    buf
}

/// Writes the key and length of a length-delimited field of `len` bytes.
pub(super) fn len_prefix(buf: &mut Vec<u8>, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

/// Bytes of a length-delimited field `tag` of `len` bytes, key included.
pub(super) fn framed_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
}

/// The framing of an `ExportTraceServiceRequest` holding, for each
/// `(scope, n)` of `scopes`, `n` bytes of encoded spans of that scope: the
/// request is `frames[0], spans[0], frames[1], spans[1], …, frames[n]`.
/// Lengths are computed first, so the spans, the bulk of the body, are
/// never moved to widen a length.
pub(super) fn request_frames(resource: &[u8], scopes: &[(&InstrumentationScope, usize)]) -> Vec<Vec<u8>> {
    let heads: Vec<(Vec<u8>, usize)> = scopes
        .iter()
        .map(|(scope, spans)| {
            let mut head = Vec::new();
            message(&mut head, 1, |buf| {
                bytes_field(buf, 1, scope.name().as_bytes());
                bytes_field(buf, 2, scope.version().unwrap_or_default().as_bytes());
                scope.attributes().for_each(|kv| key_value(buf, 3, kv));
            });
            let schema = scope.schema_url().unwrap_or_default().len();
            let schema = if schema == 0 { 0 } else { framed_len(3, schema) };
            let len = head.len() + spans + schema;
            (head, len)
        })
        .collect();
    let resource_spans = resource.len() + heads.iter().map(|(_, len)| framed_len(2, *len)).sum::<usize>();
    let mut frame = Vec::new();
    len_prefix(&mut frame, 1, resource_spans);
    frame.extend_from_slice(resource);
    let mut frames = Vec::with_capacity(scopes.len() + 1);
    for ((scope, _), (head, len)) in scopes.iter().zip(&heads) {
        len_prefix(&mut frame, 2, *len);
        frame.extend_from_slice(head);
        frames.push(std::mem::take(&mut frame));
        // The scope's schema URL follows its spans.
        bytes_field(&mut frame, 3, scope.schema_url().unwrap_or_default().as_bytes());
    }
    frames.push(frame);
    frames
}

/// An `ExportTraceServiceRequest` of the encoded spans of each scope.
pub(super) fn encode_request(resource: &[u8], scopes: &[(&InstrumentationScope, &[u8])]) -> Vec<u8> {
    let sizes: Vec<_> = scopes.iter().map(|(scope, spans)| (*scope, spans.len())).collect();
    let frames = request_frames(resource, &sizes);
    let total = frames.iter().map(Vec::len).sum::<usize>() + sizes.iter().map(|(_, n)| n).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    for (frame, spans) in frames.iter().zip(scopes.iter().map(|(_, spans)| Some(*spans)).chain([None])) {
        out.extend_from_slice(frame);
        out.extend_from_slice(spans.unwrap_or_default());
    }
    out
}

/// The request of one scope's spans built around them: `buf` holds
/// `headroom` spare bytes then the spans; the framing is written into the
/// end of the headroom and after the spans, so the spans are not copied.
/// `None` (and `buf` untouched) when the framing does not fit.
pub(super) fn request_in_place(
    resource: &[u8],
    scope: &InstrumentationScope,
    mut buf: Vec<u8>,
    headroom: usize,
) -> Result<Bytes, Vec<u8>> {
    let frames = request_frames(resource, &[(scope, buf.len() - headroom)]);
    let [head, tail] = &frames[..] else { return Err(buf) };
    let Some(start) = headroom.checked_sub(head.len()) else { return Err(buf) };
    buf[start..headroom].copy_from_slice(head);
    buf.extend_from_slice(tail);
    Ok(Bytes::from(buf).slice(start..))
}
