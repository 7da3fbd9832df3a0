//! `arca-image`: template root file systems for Arca.
//!
//! - [`debian::bootstrap`] builds the `base` template's root file system with
//!   debootstrap from Debian's mirror (no container registry needed), with a
//!   progress bar's worth of [`debian::Progress`] reports.
//! - [`shift::shift_ownership`] moves a tree's owners into the sandboxes'
//!   user-namespace id range (`root` becomes host uid `offset`), idempotently.
//! - [`disk_usage`] measures a tree the way `du -sx` does.
//!
//! OCI pulls, layer unpacking and ext4 images (ARCHITECTURE.md section 2) are
//! still to come.
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
pub mod shift;
mod walk;

pub use error::ImageError;
pub use walk::disk_usage;
