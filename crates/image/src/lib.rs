//! `arca-image`: template root file systems for Arca.
//!
//! - [`registry::pull`] pulls an OCI / Docker image (Docker v2 schema 2 or
//!   OCI manifests, multi-platform indexes, anonymous, basic or bearer-token
//!   auth, digests verified) into a [`store::LayerStore`].
//! - [`unpack::unpack_layer`] turns one layer tar into an overlayfs-format
//!   directory (whiteouts as 0:0 devices, opaque dirs as xattrs, owners
//!   shifted), refusing entries that would escape it.
//! - [`store::LayerStore`] keeps unpacked layers by id, each usable as an
//!   overlay `lowerdir`, written atomically and garbage-collected.
//! - [`layer_tar::write_layer`] and [`layer_tar::read_layer`] copy a stored
//!   layer between nodes as it is (owners, whiteouts, xattrs, hard links),
//!   the reader refusing anything that would escape its destination.
//! - [`export_ext4`] flattens a layer stack into an ext4 image for the `vm`
//!   backend.
//! - [`debian::bootstrap`] builds the `base` template's root file system with
//!   debootstrap from Debian's mirror (no container registry needed), with a
//!   progress bar's worth of [`debian::Progress`] reports.
//! - [`shift::shift_ownership`] moves a tree's owners into the sandboxes'
//!   user-namespace id range (`root` becomes host uid `offset`), idempotently.
//! - [`disk_usage`] measures a tree the way `du -sx` does.
//!
//! ```no_run
//! # async fn run() -> Result<(), arca_image::ImageError> {
//! use std::path::Path;
//! use arca_image::registry::{pull, PullOptions};
//! use arca_image::store::LayerStore;
//!
//! let store = LayerStore::open(Path::new("/var/lib/arca/layers"))?;
//! let opts = PullOptions { id_offset: 100_000, ..PullOptions::default() };
//! let image = pull("busybox:latest", &opts, &store, &|p| eprintln!("{p:?}")).await?;
//! // overlay lowerdir=top:...:bottom
//! let lower: Vec<_> = image.layers.iter().rev().map(|id| store.path(id)).collect();
//! println!("{} layers, cmd {:?}, lowerdirs {lower:?}", image.layers.len(), image.config.cmd);
//! # Ok(())
//! # }
//! ```
//!
//! Building the `base` template instead:
//!
//! ```no_run
//! # async fn run() -> Result<(), arca_image::ImageError> {
//! use std::path::Path;
//! use arca_image::debian::{bootstrap, BootstrapOptions};
//!
//! let dest = Path::new("/var/lib/arca/templates/base/rootfs");
//! bootstrap(&BootstrapOptions::base(dest), &|p| {
//!     eprintln!("[{:>3.0}%] {:?}: {}", p.fraction * 100.0, p.phase, p.message);
//! })
//! .await?;
//! let stats = arca_image::shift::shift_ownership(dest, 100_000)?;
//! println!("{} inodes shifted, {} bytes", stats.changed, arca_image::disk_usage(dest)?);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod debian;
mod error;
mod export;
mod fsx;
pub mod layer_tar;
pub mod registry;
pub mod shift;
pub mod store;
pub mod unpack;
mod walk;

#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod testing;

pub use error::ImageError;
pub use export::{Ext4Options, export_ext4, export_ext4_with, flatten};
pub use walk::disk_usage;

#[cfg(test)]
mod test_root {
    /// Whether a test that needs root can run: skips (saying `what` needs
    /// root) when not root, fails when privileged tests were asked for.
    pub(crate) fn require_root(what: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(
            std::env::var("ARCA_TEST_PRIVILEGED").as_deref() != Ok("1"),
            "ARCA_TEST_PRIVILEGED=1 but not running as root"
        );
        eprintln!("skipped: {what} needs root");
        false
    }
}
