//! Talking to a registry through `oci-client` ([`Remote`]): resolving a
//! reference to its digest with the caller's credentials (the tenancy
//! check), fetching manifests by digest and blobs into files, each verified
//! against its digest; a broken blob download resumes from its byte offset
//! (HTTP range) a few times. Registry errors become [`ImageError`]s whose
//! messages carry neither URLs (they name the repository) nor credentials.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
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
        f.debug_struct("Remote").field("auth", &self.auth).finish_non_exhaustive()
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
        E::RequestError(e) => ImageError::Unavailable(crate::util::chain(&e.without_url())),
        E::IoError(e) => ImageError::Unavailable(format!("transfer broke off: {e}")),
        E::DigestError(e) => ImageError::DigestMismatch { digest: String::new(), reason: e.to_string() },
        E::ImageManifestNotFoundError(m) => ImageError::NotFound(m),
        E::UnsupportedMediaTypeError(m) | E::IncompatibleLayerMediaTypeError(m) => ImageError::UnsupportedMediaType(m),
        other => ImageError::Unsupported(other.to_string()),
    }
}

impl Remote {
    /// A client for `reference` over HTTPS (plain HTTP when its registry is
    /// in `insecure`), authenticating with `creds` (anonymous without).
    pub fn new(reference: Reference, creds: Option<Credentials>, insecure: &[String], retries: u32) -> Remote {
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure.to_vec()),
            // An index is resolved here (`manifest::pick_platform`), not by the client.
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("metald/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        Remote { client: Client::new(config), reference, auth, retries }
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
