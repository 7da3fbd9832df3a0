//! The one error type of this crate. Messages end with what an operator can
//! do about it, because most of these surface on a first `arca up`.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong while building or preparing a root file system.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The operation needs root (CAP_CHOWN, CAP_SYS_CHROOT, CAP_SETFCAP).
    #[error("{action} needs root: run arca as root")]
    NotRoot {
        /// What was attempted.
        action: &'static str,
    },

    /// `debootstrap` is not installed on this host.
    #[error("debootstrap not found in PATH: install debootstrap (scripts/setup.sh does)")]
    DebootstrapMissing,

    /// debootstrap could not fetch from the Debian mirror.
    #[error(
        "cannot download from the Debian mirror {mirror}: {detail}; check the host's network \
         (and proxy), or point apt's sources at a mirror that works"
    )]
    MirrorUnreachable {
        /// The mirror URL that was used.
        mirror: String,
        /// debootstrap's own `E:` message.
        detail: String,
    },

    /// debootstrap failed for another reason.
    #[error("debootstrap failed ({status}): {detail}")]
    Debootstrap {
        /// Exit status, as printed by the OS.
        status: String,
        /// `E:` lines and the tail of debootstrap's log.
        detail: String,
    },

    /// A customisation step inside the new root failed.
    #[error("{step} in the new root file system failed ({status}): {output}")]
    Chroot {
        /// The step, e.g. `useradd`.
        step: &'static str,
        /// Exit status, as printed by the OS.
        status: String,
        /// The step's output (stderr, then stdout), trimmed.
        output: String,
    },

    /// The destination already exists; bootstrap only fills fresh directories.
    #[error("{} already exists: remove it first or choose another destination", path.display())]
    DestExists {
        /// The destination.
        path: PathBuf,
    },

    /// `shift_ownership` was given an offset its id arithmetic cannot work with.
    #[error(
        "uid/gid offset {offset} is invalid: it must be at least {min} so that shifted and \
         unshifted ids cannot be confused, and offset + {min} must fit in 32 bits"
    )]
    InvalidOffset {
        /// The offset given.
        offset: u32,
        /// The smallest valid offset (the size of the id range).
        min: u32,
    },

    /// An image reference does not parse.
    #[error("invalid image reference `{reference}`: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A platform string (`os/arch[/variant]`) does not parse.
    #[error("invalid platform `{platform}`: expected os/architecture[/variant], e.g. linux/amd64")]
    InvalidPlatform {
        /// The platform as given.
        platform: String,
    },

    /// A layer id is not 1 to 100 characters of `[a-z0-9-]`.
    #[error(
        "invalid layer id `{id}`: use 1 to 100 characters of a-z, 0-9 and `-`, starting with a \
         letter or digit"
    )]
    InvalidLayerId {
        /// The id as given.
        id: String,
    },

    /// The layer is not in the store.
    #[error("layer {id} is not in the layer store")]
    LayerMissing {
        /// The layer.
        id: crate::store::LayerId,
    },

    /// A cached layer was unpacked with another uid/gid offset than this pull asks for.
    #[error(
        "layer {id} in the store was unpacked with id offset {stored}, not {wanted}: use one \
         store per id offset, or remove the layer"
    )]
    LayerOffsetMismatch {
        /// The layer.
        id: crate::store::LayerId,
        /// The offset recorded in its metadata.
        stored: u32,
        /// The offset of this pull.
        wanted: u32,
    },

    /// The registry has no manifest for this reference.
    #[error(
        "image {reference} not found on registry {registry} (manifest unknown): check the name and tag"
    )]
    ManifestUnknown {
        /// The image reference, normalised.
        reference: String,
        /// The registry asked.
        registry: String,
    },

    /// The registry refused access (HTTP 401/403), or its token server did.
    #[error("registry {registry} refused access to {reference}: {detail}")]
    Unauthorized {
        /// The registry (or token realm) that refused.
        registry: String,
        /// The image reference, normalised.
        reference: String,
        /// Why, with what to do about it.
        detail: String,
    },

    /// Credentials would have gone over plain HTTP to a host not listed as insecure.
    #[error(
        "refusing to send credentials over plain HTTP to {url}: use HTTPS, or list the host in \
         the insecure registries if that is intended"
    )]
    InsecureCredentials {
        /// Where they would have gone.
        url: String,
    },

    /// The registry could not be reached (DNS, connect, TLS, reset, timeout).
    #[error("cannot reach registry {registry}")]
    RegistryUnreachable {
        /// The registry (host, or token realm).
        registry: String,
        /// The network error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The registry answered with an unexpected HTTP status.
    #[error("registry {registry} answered {status} for {url}: {detail}")]
    RegistryStatus {
        /// The registry.
        registry: String,
        /// The URL requested.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The registry's error message, if it sent one.
        detail: String,
    },

    /// The registry sent something that breaks the protocol (bad JSON,
    /// missing header, oversized manifest, wrong size).
    #[error("registry {registry} sent an invalid response: {detail}")]
    RegistryProtocol {
        /// The registry.
        registry: String,
        /// What was wrong.
        detail: String,
    },

    /// Content does not match its digest: refused.
    #[error("{what} has digest {actual}, expected {expected}: refusing it")]
    DigestMismatch {
        /// What was checked, e.g. `blob sha256:…` or `manifest of …`.
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },

    /// The manifest or image config cannot be used.
    #[error("image {reference} cannot be used: {detail}")]
    InvalidImage {
        /// The image reference, normalised.
        reference: String,
        /// What is wrong.
        detail: String,
    },

    /// A multi-platform image has no manifest for the wanted platform.
    #[error("image {reference} has no variant for platform {wanted} (it has: {available})")]
    NoMatchingPlatform {
        /// The image reference, normalised.
        reference: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms the index lists.
        available: String,
    },

    /// Pulling one layer failed.
    #[error("layer {digest}")]
    Layer {
        /// The layer's blob digest.
        digest: String,
        /// What went wrong.
        #[source]
        source: Box<ImageError>,
    },

    /// A layer tar entry would escape the layer or is otherwise malformed: the
    /// whole layer is refused.
    #[error("refusing layer entry `{entry}`: {reason}")]
    UnsafeEntry {
        /// The entry's path as in the tar.
        entry: String,
        /// Why it was refused.
        reason: String,
    },

    /// Creating one layer entry failed.
    #[error("cannot {action} layer entry `{entry}`")]
    UnpackEntry {
        /// The entry's path as in the tar.
        entry: String,
        /// What was attempted.
        action: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The layer stream is not a readable tar (or its compression is broken).
    #[error("cannot read the layer archive")]
    LayerArchive {
        /// The read or decompression error.
        #[source]
        source: io::Error,
    },

    /// The layer's compression is not supported.
    #[error("{format} layers are not supported: only gzip, zstd and uncompressed tar are")]
    UnsupportedCompression {
        /// The compression found.
        format: &'static str,
    },

    /// The layer's media type is not a tar layer we can use.
    #[error("layer {digest} has media type {media_type}, which is not supported")]
    UnsupportedLayer {
        /// The layer's blob digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },

    /// A host tool is missing.
    #[error("{tool} not found in PATH: install {package} (scripts/setup.sh does)")]
    ToolMissing {
        /// The tool.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },

    /// A host tool failed.
    #[error("{tool} failed ({status}): {output}")]
    ToolFailed {
        /// The tool.
        tool: &'static str,
        /// Exit status, as printed by the OS.
        status: String,
        /// Its output (stderr, then stdout), trimmed.
        output: String,
    },

    /// A file-system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was attempted, e.g. `chown`.
        action: &'static str,
        /// The path it was attempted on.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// An [`ImageError::Io`] for `action` on `path`.
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_a_next_step() {
        assert!(
            ImageError::DebootstrapMissing
                .to_string()
                .contains("scripts/setup.sh")
        );
        let e = ImageError::MirrorUnreachable {
            mirror: "http://m/debian".into(),
            detail: "Failed getting release file".into(),
        };
        assert!(e.to_string().contains("http://m/debian"));
        assert!(
            ImageError::NotRoot { action: "x" }
                .to_string()
                .contains("as root")
        );
        let e = ImageError::io("chown", Path::new("/a/b"), io::Error::other("boom"));
        assert_eq!(e.to_string(), "chown /a/b: boom");
    }
}
