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
