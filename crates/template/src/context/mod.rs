//! Build contexts: unpacking what the SDKs upload, and what a COPY takes
//! from it.
//!
//! A Dockerfile build's context and each E2B COPY step's files arrive as a
//! tar archive (gzip-compressed by default) named by a hash.
//! [`unpack_upload`] turns one into a directory without letting any entry
//! escape it; [`resolve_copy`] then lists, with Docker's COPY rules and the
//! context's [`DockerIgnore`], exactly which files, directories and links a
//! COPY writes where, and hashes them for the layer cache. Executing the
//! list inside the build sandbox (owners from [`parse_chown`], creating
//! missing parents) is the builder's part.
//!
//! ```
//! use arca_template::context::{DockerIgnore, EntryKind, resolve_copy};
//! use arca_template::{CopySpec, Source};
//!
//! let ctx = tempfile::tempdir()?;
//! std::fs::create_dir(ctx.path().join("src"))?;
//! std::fs::write(ctx.path().join("src/main.py"), "print(1)\n")?;
//! std::fs::write(ctx.path().join("src/notes.md"), "draft\n")?;
//! let ignore = DockerIgnore::parse("*.md\n**/*.md\n")?;
//! let spec = CopySpec {
//!     sources: vec![Source::Path("src".into())],
//!     dest: "app/".into(),
//!     from: None,
//!     chown: None,
//!     chmod: Some("0755".into()),
//! };
//! let plan = resolve_copy(ctx.path(), &spec, "/srv", &ignore)?;
//! let dests: Vec<&str> = plan.entries.iter().map(|e| e.dest.as_str()).collect();
//! assert_eq!(dests, ["/srv/app", "/srv/app/main.py"]);
//! assert!(matches!(plan.entries[1].kind, EntryKind::File));
//! assert_eq!(plan.entries[1].src, ctx.path().join("src/main.py"));
//! assert_eq!(plan.entries[1].mode, 0o755);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod copy;
mod glob;
mod ignore;
mod unpack;

pub use copy::{
    CopyEntry, CopyError, CopyPlan, EntryKind, INLINE_FILE_MODE, parse_chmod, parse_chown,
    resolve_copy,
};
pub use ignore::{DockerIgnore, IgnoreError};
pub use unpack::{MAX_UNPACKED_BYTES, UnpackError, UnpackSummary, unpack_upload};

pub(crate) use copy::{field, hex};
