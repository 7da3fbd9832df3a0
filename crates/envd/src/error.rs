//! Turning operating-system errors into Connect errors a user can act on.

use std::io;
use std::path::Path;

use arca_proto::connect::{Code, ConnectError};
use nix::libc;

/// Maps an I/O error from `action` on `path` to a Connect error.
pub(crate) fn io_error(err: &io::Error, action: &str, path: &Path) -> ConnectError {
    let p = path.display();
    match err.raw_os_error() {
        Some(libc::ENOENT) => {
            ConnectError::new(Code::NotFound, format!("no such file or directory: {p}"))
        }
        Some(libc::EACCES | libc::EPERM) => ConnectError::new(
            Code::PermissionDenied,
            format!("permission denied: {action} {p}"),
        ),
        Some(libc::ENOTDIR) => ConnectError::new(
            Code::InvalidArgument,
            format!("a component of {p} is not a directory"),
        ),
        Some(libc::EISDIR) => {
            ConnectError::new(Code::InvalidArgument, format!("{p} is a directory"))
        }
        Some(libc::EEXIST) => ConnectError::new(Code::AlreadyExists, format!("{p} already exists")),
        Some(libc::ENOSPC | libc::EDQUOT) => ConnectError::new(
            Code::ResourceExhausted,
            format!("no space left on device: {action} {p}"),
        ),
        Some(libc::EROFS) => ConnectError::new(
            Code::PermissionDenied,
            format!("read-only file system: {action} {p}"),
        ),
        Some(libc::ENAMETOOLONG) => {
            ConnectError::new(Code::InvalidArgument, format!("file name too long: {p}"))
        }
        Some(libc::ENOTEMPTY) => ConnectError::new(
            Code::FailedPrecondition,
            format!("directory not empty: {p}"),
        ),
        Some(libc::EXDEV) => ConnectError::new(
            Code::FailedPrecondition,
            format!("{action} {p}: source and destination are on different file systems"),
        ),
        _ => ConnectError::new(Code::Internal, format!("{action} {p}: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_maps_to_codes_with_the_path_in_the_message() {
        let p = Path::new("/x/y");
        let e = io_error(&io::Error::from_raw_os_error(libc::ENOENT), "open", p);
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().contains("/x/y"));
        let e = io_error(&io::Error::from_raw_os_error(libc::EACCES), "open", p);
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = io_error(&io::Error::from_raw_os_error(libc::ENOTDIR), "open", p);
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = io_error(&io::Error::from_raw_os_error(libc::ENOSPC), "write", p);
        assert_eq!(e.code(), Code::ResourceExhausted);
    }
}
