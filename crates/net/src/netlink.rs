//! Small netlink helpers shared by [`nflog`](crate::nflog) and
//! [`setelem`](crate::setelem): splitting datagrams into messages and
//! attributes, and building messages with (nested) attributes.
//!
//! Layout (`linux/netlink.h`): every datagram holds one or more messages
//! (16-byte header: length, type, flags, sequence, port id; each padded to
//! 4 bytes). Netfilter messages carry a 4-byte `nfgenmsg` (family,
//! version, resource id in network order) and then attributes (2-byte
//! length, 2-byte type, data, padded to 4). Header fields are in host
//! order.

use std::io;

/// Length of `struct nlmsghdr`.
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// Length of `struct nfgenmsg`.
pub(crate) const NFGENMSG_LEN: usize = 4;
/// Length of `struct nlattr`.
pub(crate) const NLA_HDRLEN: usize = 4;

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_CREATE: u16 = 0x400;

/// Attribute type bits; the top two are `NLA_F_NESTED` and
/// `NLA_F_NET_BYTEORDER`.
pub(crate) const NLA_TYPE_MASK: u16 = 0x3fff;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;

pub(crate) const NFNETLINK_V0: u8 = 0;
pub(crate) const AF_UNSPEC: u8 = 0;

/// `io::Error` of the same kind as `err`, with `context` in front.
pub(crate) fn context(err: impl Into<io::Error>, context: impl std::fmt::Display) -> io::Error {
    let err = err.into();
    io::Error::new(err.kind(), format!("{context}: {err}"))
}

pub(crate) fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// Splits `buf` into `(type, seq, body)` per netlink message. Stops at the
/// first header whose length is impossible (truncated or corrupt input).
pub(crate) fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = usize::try_from(u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]))
            .unwrap_or(usize::MAX);
        if len < NLMSG_HDRLEN || len > rest.len() {
            rest = &[];
            return None;
        }
        let ty = u16::from_ne_bytes([rest[4], rest[5]]);
        let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let body = &rest[NLMSG_HDRLEN..len];
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some((ty, seq, body))
    })
}

/// Splits attribute data into `(type, payload)`, flag bits masked off.
/// Stops at the first attribute whose length is impossible.
pub(crate) fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLA_HDRLEN {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        if len < NLA_HDRLEN || len > rest.len() {
            rest = &[];
            return None;
        }
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        let data = &rest[NLA_HDRLEN..len];
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some((ty, data))
    })
}

/// The errno of an `NLMSG_ERROR` body (0 for an acknowledgement), made
/// positive; `None` if the body is too short.
pub(crate) fn error_code(body: &[u8]) -> Option<i32> {
    let e = body.get(0..4)?;
    Some(i32::from_ne_bytes([e[0], e[1], e[2], e[3]]).saturating_neg())
}

/// Builds one or more netlink messages into one buffer (a datagram).
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Appends one message: header (port id 0, the kernel fills in ours),
    /// the 4-byte `nfgenmsg`, then whatever `body` writes.
    pub(crate) fn message(
        &mut self,
        ty: u16,
        flags: u16,
        seq: u32,
        genmsg: [u8; NFGENMSG_LEN],
        body: impl FnOnce(&mut Self),
    ) {
        let start = self.buf.len();
        self.buf.resize(start + NLMSG_HDRLEN, 0);
        self.buf.extend_from_slice(&genmsg);
        body(self);
        self.buf.resize(align4(self.buf.len()), 0);
        let len = u32::try_from(self.buf.len() - start).unwrap_or(u32::MAX);
        let h = &mut self.buf[start..start + NLMSG_HDRLEN];
        h[0..4].copy_from_slice(&len.to_ne_bytes());
        h[4..6].copy_from_slice(&ty.to_ne_bytes());
        h[6..8].copy_from_slice(&flags.to_ne_bytes());
        h[8..12].copy_from_slice(&seq.to_ne_bytes());
    }

    /// Appends one attribute, padded to 4 bytes.
    pub(crate) fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = u16::try_from(NLA_HDRLEN + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// Appends a nested attribute (`NLA_F_NESTED`) holding what `body`
    /// writes.
    pub(crate) fn nested(&mut self, ty: u16, body: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.buf.resize(start + NLA_HDRLEN, 0);
        body(self);
        let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn nested_attributes_and_messages_round_trip() {
        let mut w = Writer::new();
        w.message(0x10, NLM_F_REQUEST, 7, [1, 2, 3, 4], |m| {
            m.attr(1, b"abc");
            m.nested(2, |m| m.attr(3, &[9; 4]));
        });
        w.message(0x11, NLM_F_ACK, 8, [0; 4], |_| {});
        let b = w.into_bytes();
        assert_eq!(b.len(), (16 + 4 + 8 + 4 + 8) + (16 + 4));
        let msgs: Vec<_> = messages(&b).collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].0, msgs[0].1), (0x10, 7));
        assert_eq!((msgs[1].0, msgs[1].1), (0x11, 8));
        assert_eq!(&msgs[0].2[..4], &[1, 2, 3, 4]);
        let attrs: Vec<_> = attributes(&msgs[0].2[4..]).collect();
        assert_eq!(
            attrs,
            vec![(1, &b"abc"[..]), (2, &[8, 0, 3, 0, 9, 9, 9, 9][..])]
        );
        // The nested flag is on the wire, masked off when parsed.
        assert_eq!(u16::from_ne_bytes([b[30], b[31]]), 2 | NLA_F_NESTED);
        assert_eq!(error_code(&(-2i32).to_ne_bytes()), Some(2));
        assert_eq!(error_code(&[0, 0]), None);
    }
}
