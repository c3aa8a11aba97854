//! Talking to a registry through `oci-client` ([`Remote`]): resolving a
//! reference to its digest with the caller's credentials (the tenancy
//! check), fetching manifests by digest and blobs into files, each verified
//! against its digest; a broken blob download resumes from its byte offset
//! (HTTP range) a few times. Registry errors become [`ImageError`]s whose
//! messages carry neither URLs (they name the repository) nor credentials.
//! [`Connect`] is how clients are made: HTTPS (trusting the built-in roots
//! plus the operator's `UNKEY_METALD_IMAGE_CA_FILE`) except for the
//! registries marked insecure.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};

use super::auth::Credentials;
use super::digest;
use super::error::ImageError;
use super::manifest::{ACCEPTED, Blob};
use super::settings::ImageSettings;

/// How registry clients are made, from the settings: plain HTTP for the
/// insecure registries, HTTPS for the others trusting the built-in roots
/// and the operator's CA bundle; the download retries.
#[derive(Clone, Default)]
pub struct Connect {
    insecure: Vec<String>,
    /// The PEM bundle of `UNKEY_METALD_IMAGE_CA_FILE`, checked at load.
    ca_pem: Option<Vec<u8>>,
    retries: u32,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("insecure", &self.insecure)
            .field("ca_file", &self.ca_pem.is_some())
            .field("retries", &self.retries)
            .finish()
    }
}

const PEM_CERT: &str = "-----BEGIN CERTIFICATE-----";

impl Connect {
    /// From the settings; reads and checks the CA file (blocking): it must
    /// hold at least one PEM certificate and every one must parse.
    pub fn new(settings: &ImageSettings) -> Result<Connect, ImageError> {
        let ca_pem = match &settings.ca_file {
            Some(path) => Some(Self::load_ca(path)?),
            None => None,
        };
        let connect = Connect { insecure: settings.insecure_registries.clone(), ca_pem, retries: settings.retries };
        // Building a client parses the certificates.
        connect.client().map_err(|e| ImageError::CaFile {
            path: settings.ca_file.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            reason: crate::util::chain(&e),
        })?;
        Ok(connect)
    }

    fn load_ca(path: &Path) -> Result<Vec<u8>, ImageError> {
        let bad = |reason: String| ImageError::CaFile { path: path.display().to_string(), reason };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        if !String::from_utf8_lossy(&pem).contains(PEM_CERT) {
            return Err(bad(format!("no PEM certificate ({PEM_CERT}) in it")));
        }
        Ok(pem)
    }

    fn client(&self) -> Result<Client, ImageError> {
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.insecure.clone()),
            // An index is resolved here (`manifest::pick_platform`), not by the client.
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("metald/", env!("CARGO_PKG_VERSION")),
            extra_root_certificates: self
                .ca_pem
                .iter()
                .map(|pem| Certificate { encoding: CertificateEncoding::Pem, data: pem.clone() })
                .collect(),
            ..ClientConfig::default()
        };
        // Not `Client::new`: it falls back to a default client on errors.
        Client::try_from(config).map_err(|e| ImageError::Task(format!("registry client: {}", map_error(e))))
    }
}

/// One caller's view of one repository: a client of its own (so tokens and
/// credentials are never shared between customers) and its credentials.
pub struct Remote {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    retries: u32,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not even the user name: a customer's registry account is theirs.
        let auth = if matches!(self.auth, RegistryAuth::Anonymous) { "anonymous" } else { "<redacted>" };
        f.debug_struct("Remote").field("auth", &auth).finish_non_exhaustive()
    }
}

/// A registry error as an [`ImageError`], without URLs.
pub fn map_error(e: OciDistributionError) -> ImageError {
    use OciDistributionError as E;
    match e {
        E::UnauthorizedError { .. } => {
            ImageError::Denied("the registry answered 401 (credentials missing or refused)".into())
        }
        E::AuthenticationFailure(_) => ImageError::Denied("the registry refused the token request".into()),
        E::RegistryError { envelope, .. } => {
            let message = envelope.errors.first().map(|e| e.message.clone()).unwrap_or_default();
            match envelope.errors.first().map(|e| &e.code) {
                Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => ImageError::Denied(message),
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::ManifestBlobUnknown
                    | OciErrorCode::NotFound,
                ) => ImageError::NotFound(message),
                Some(OciErrorCode::NameInvalid | OciErrorCode::TagInvalid | OciErrorCode::DigestInvalid) => {
                    ImageError::BadReference(message)
                }
                _ => ImageError::Unavailable(format!("registry error: {message}")),
            }
        }
        E::ServerError { code, .. } => match code {
            401 | 403 => ImageError::Denied(format!("the registry answered {code}")),
            404 => ImageError::NotFound("the registry has no such repository, tag or digest".into()),
            400 => ImageError::BadReference("the registry refused the request (400)".into()),
            _ => ImageError::Unavailable(format!("the registry answered {code}")),
        },
        E::RequestError(e) => {
            let chain = crate::util::chain(&e.without_url());
            match tls_problem(&chain) {
                Some(why) => ImageError::Tls(why),
                None => ImageError::Unavailable(chain),
            }
        }
        E::IoError(e) => ImageError::Unavailable(format!("transfer broke off: {e}")),
        E::DigestError(e) => ImageError::DigestMismatch { digest: String::new(), reason: e.to_string() },
        E::ImageManifestNotFoundError(m) => ImageError::NotFound(m),
        E::UnsupportedMediaTypeError(m) | E::IncompatibleLayerMediaTypeError(m) => ImageError::UnsupportedMediaType(m),
        other => ImageError::Unsupported(other.to_string()),
    }
}

/// A TLS failure in a request error's chain (rustls's wording), as what
/// the operator must do: the registry's certificate is refused (an unknown
/// CA, or not valid for the registry's name), or the registry does not
/// speak TLS at all. `None` for other (network) failures.
fn tls_problem(chain: &str) -> Option<String> {
    let lower = chain.to_ascii_lowercase();
    let wrong_name = lower.contains("not valid for name") || lower.contains("notvalidforname");
    if lower.contains("invalid peer certificate") && wrong_name {
        Some(format!(
            "the registry's TLS certificate is not valid for its host name ({chain}): the certificate \
             must name the host (or IP address) of the reference"
        ))
    } else if lower.contains("invalid peer certificate") || lower.contains("certificate verify failed") {
        Some(format!(
            "the registry's TLS certificate is not trusted ({chain}): add the CA that signed it to \
             UNKEY_METALD_IMAGE_CA_FILE"
        ))
    } else if lower.contains("invalidcontenttype") || lower.contains("corrupt message") {
        Some(format!(
            "the registry does not answer TLS ({chain}): if it serves plain HTTP, list it in \
             UNKEY_METALD_IMAGE_INSECURE_REGISTRIES"
        ))
    } else {
        None
    }
}

impl Remote {
    /// A client for `reference` made as `connect` says, authenticating
    /// with `creds` (anonymous without).
    pub fn new(reference: Reference, creds: Option<Credentials>, connect: &Connect) -> Result<Remote, ImageError> {
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        Ok(Remote { client: connect.client()?, reference, auth, retries: connect.retries })
    }

    /// The digest the reference names now (a `HEAD` of the manifest, with
    /// this caller's credentials): the check that the caller may pull it.
    pub async fn resolve(&self) -> Result<String, ImageError> {
        let digest = self.client.fetch_manifest_digest(&self.reference, &self.auth).await.map_err(map_error)?;
        digest::hex_of(&digest)?;
        Ok(digest)
    }

    /// The manifest (or index) `digest`, verified.
    pub async fn manifest(&self, digest: &str, size: Option<u64>) -> Result<Vec<u8>, ImageError> {
        let by_digest = self.reference.clone_with_digest(digest.to_owned());
        let (bytes, _) = self.client.pull_manifest_raw(&by_digest, &self.auth, ACCEPTED).await.map_err(map_error)?;
        digest::verify(digest, size, &digest::of_bytes(&bytes), bytes.len() as u64)?;
        Ok(bytes.to_vec())
    }

    /// Downloads `blob` into `dest` (created), verified; resumes from the
    /// offset reached after a broken transfer, up to the retries.
    pub async fn blob(&self, blob: &Blob, dest: &Path) -> Result<(), ImageError> {
        // Chunks from the network are small (~16 KiB); each write to a
        // tokio file is a trip to the blocking pool, so they are gathered
        // into 1 MiB writes.
        let file = tokio::fs::File::create(dest).await.map_err(ImageError::io("create", dest))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        let mut state = Download { hasher: Sha256::new(), offset: 0 };
        let mut attempt = 0;
        loop {
            match self.attempt(blob, dest, &mut file, &mut state).await {
                Ok(()) => break,
                Err(e) if e.code() == crate::model::Code::Unavailable && attempt < self.retries => {
                    attempt += 1;
                    tracing::debug!(digest = %blob.digest, offset = state.offset, attempt, "resuming a blob download");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(e) => return Err(e),
            }
        }
        // No fsync: blobs live only as long as this pull's work directory
        // (a crash leaves them to `Images::open`, which removes them); the
        // base built from them is synced.
        file.flush().await.map_err(ImageError::io("write", dest))?;
        digest::verify(&blob.digest, Some(blob.size), &digest::finish(state.hasher), state.offset)
    }

    async fn attempt(
        &self,
        blob: &Blob,
        dest: &Path,
        file: &mut BufWriter<tokio::fs::File>,
        state: &mut Download,
    ) -> Result<(), ImageError> {
        let desc = OciDescriptor {
            digest: blob.digest.clone(),
            size: i64::try_from(blob.size).unwrap_or(i64::MAX),
            ..OciDescriptor::default()
        };
        let response = self
            .client
            .pull_blob_stream_partial(&self.reference, &desc, state.offset, None)
            .await
            .map_err(map_error)?;
        let mut stream = match response {
            BlobResponse::Partial(s) => s.stream,
            BlobResponse::Full(s) => {
                if state.offset > 0 {
                    // No range support: start over.
                    file.flush().await.map_err(ImageError::io("write", dest))?;
                    file.get_mut().set_len(0).await.map_err(ImageError::io("truncate", dest))?;
                    file.seek(std::io::SeekFrom::Start(0)).await.map_err(ImageError::io("rewind", dest))?;
                    *state = Download { hasher: Sha256::new(), offset: 0 };
                }
                s.stream
            }
        };
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // The full-response stream checks the digest itself at its
                // end; all bytes are here, so the check below decides.
                Err(_) if state.offset == blob.size => break,
                Err(e) => return Err(ImageError::Unavailable(format!("transfer broke off: {e}"))),
            };
            let len = chunk.len() as u64;
            if state.offset + len > blob.size {
                return Err(ImageError::DigestMismatch {
                    digest: blob.digest.clone(),
                    reason: format!("more than the {} bytes its descriptor says", blob.size),
                });
            }
            state.hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(ImageError::io("write", dest))?;
            state.offset += len;
        }
        if state.offset < blob.size {
            return Err(ImageError::Unavailable(format!(
                "transfer ended after {} of {} bytes",
                state.offset, blob.size
            )));
        }
        Ok(())
    }
}

/// How far a blob download got.
struct Download {
    hasher: Sha256,
    offset: u64,
}

#[cfg(test)]
mod tests {
    use super::tls_problem;

    #[test]
    fn tls_failures_say_what_to_configure_and_network_failures_are_not_tls() {
        let connect = "error sending request: client error (Connect): ";
        let unknown = tls_problem(&format!("{connect}invalid peer certificate: UnknownIssuer")).unwrap_or_default();
        assert!(unknown.contains("UNKEY_METALD_IMAGE_CA_FILE") && unknown.contains("UnknownIssuer"), "{unknown}");
        let name = tls_problem(&format!(
            "{connect}invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only \
             valid for DnsName(\"registry.example.internal\")"
        ))
        .unwrap_or_default();
        assert!(name.contains("host name") && !name.contains("CA_FILE"), "{name}");
        let plain = tls_problem(&format!("{connect}received corrupt message of type InvalidContentType"));
        assert!(plain.unwrap_or_default().contains("UNKEY_METALD_IMAGE_INSECURE_REGISTRIES"));
        assert_eq!(tls_problem(&format!("{connect}tcp connect error: Connection refused (os error 111)")), None);
    }
}
