//! Finds the server name (SNI, RFC 6066 section 3) in the first bytes a
//! TLS client sends, without terminating TLS.
//!
//! The ClientHello may be split over several handshake records (large key
//! shares make that common) and each record over several reads, so the
//! caller feeds everything received so far and gets [`Hello::Incomplete`]
//! until the whole message is there. Anything that is not a well-formed
//! ClientHello is [`Hello::Invalid`]; so are a second `server_name`
//! extension or a second host name, which different servers could read
//! differently. With ECH only the outer (public) name is visible, and that
//! is what gets checked; the parser reports whether the
//! `encrypted_client_hello` extension is there, for
//! `EgressConfig::refuse_ech`.

/// Largest ClientHello accepted, and the most the listener buffers
/// (ADR 0005 section 3).
pub(crate) const MAX_HELLO: usize = 16 * 1024;
/// Largest TLS record payload (RFC 8446 section 5.1).
const MAX_RECORD: usize = 1 << 14;
/// Record content type of handshake messages.
const HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Extension number of `server_name`.
const SERVER_NAME: u16 = 0;
/// Extension number of `encrypted_client_hello` (draft-ietf-tls-esni).
const ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// What the bytes received so far hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hello {
    /// A prefix of a plausible ClientHello: read more.
    Incomplete,
    /// A whole ClientHello.
    Complete {
        /// Its host name (lowercase, no trailing dot), if it has one; with
        /// ECH, the outer one.
        name: Option<String>,
        /// Whether it carries an `encrypted_client_hello` extension (real
        /// ECH or GREASE: they look the same).
        ech: bool,
    },
    /// Not a ClientHello this listener accepts; the reason is for logs.
    Invalid(&'static str),
}

/// Looks at the bytes a client sent so far.
pub(crate) fn parse(buf: &[u8]) -> Hello {
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        // The handshake header says how long the message is; stop as soon
        // as enough records have arrived.
        if handshake.len() >= 4 {
            if handshake[0] != CLIENT_HELLO {
                return Hello::Invalid("first handshake message is not a ClientHello");
            }
            let len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if len > MAX_HELLO {
                return Hello::Invalid("ClientHello too large");
            }
            if handshake.len() >= 4 + len {
                return match body(&handshake[4..4 + len]) {
                    Ok((name, ech)) => Hello::Complete { name, ech },
                    Err(why) => Hello::Invalid(why),
                };
            }
        }
        let Some(header) = buf.get(pos..pos + 5) else {
            return Hello::Incomplete;
        };
        if header[0] != HANDSHAKE {
            return Hello::Invalid("not a TLS handshake record");
        }
        if header[1] != 3 {
            return Hello::Invalid("unknown TLS record version");
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Hello::Invalid("bad TLS record length");
        }
        let Some(payload) = buf.get(pos + 5..pos + 5 + len) else {
            return Hello::Incomplete;
        };
        handshake.extend_from_slice(payload);
        pos += 5 + len;
    }
}

/// A cursor over a byte slice whose reads fail past the end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if n > self.buf.len() {
            return Err("ClientHello truncated");
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Result<&'a [u8], &'static str> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Result<&'a [u8], &'static str> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// The ClientHello body (RFC 8446 section 4.1.2; TLS 1.2's is the same
/// shape): its host name, and whether it has the ECH extension.
fn body(hello: &[u8]) -> Result<(Option<String>, bool), &'static str> {
    let mut r = Reader { buf: hello };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err("session id too long");
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("bad cipher suite list");
    }
    if r.vec8()?.is_empty() {
        return Err("no compression methods");
    }
    if r.buf.is_empty() {
        // SSLv3-style hello without extensions: no name.
        return Ok((None, false));
    }
    let extensions = r.vec16()?;
    if !r.buf.is_empty() {
        return Err("bytes after the extensions");
    }
    let mut exts = Reader { buf: extensions };
    let mut name = None;
    let mut seen = false;
    let mut ech = false;
    while !exts.buf.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind == ENCRYPTED_CLIENT_HELLO {
            ech = true;
        }
        if kind != SERVER_NAME {
            continue;
        }
        if seen {
            return Err("two server_name extensions");
        }
        seen = true;
        name = server_name(data)?;
    }
    Ok((name, ech))
}

/// The `server_name` extension: a list of (type, name); type 0 is a DNS
/// host name.
fn server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader { buf: data };
    let list = r.vec16()?;
    if !r.buf.is_empty() {
        return Err("bytes after the server name list");
    }
    let mut list = Reader { buf: list };
    let mut host = None;
    while !list.buf.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind != 0 {
            continue;
        }
        if host.is_some() {
            return Err("two host names");
        }
        host = Some(hostname(name).ok_or("malformed host name")?);
    }
    Ok(host)
}

/// A DNS host name in lowercase without a trailing dot: labels of letters,
/// digits, `-` and `_`, 1 to 63 bytes each, 253 bytes in all.
fn hostname(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > 253 {
        return None;
    }
    let ok = raw.split(|b| *b == b'.').all(|label| {
        (1..=63).contains(&label.len())
            && label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    });
    ok.then(|| String::from_utf8_lossy(raw).to_ascii_lowercase())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight of a real TLS client (rustls) for `name`, or without
    /// SNI when `name` is an IP address.
    pub(crate) fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Re-frames one record's handshake payload into records of `size` bytes.
    fn split_records(hello: &[u8], size: usize) -> Vec<u8> {
        let payload = &hello[5..];
        let mut out = Vec::new();
        for chunk in payload.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A complete hello without ECH, named `name`.
    fn named(name: &str) -> Hello {
        Hello::Complete {
            name: Some(name.into()),
            ech: false,
        }
    }

    #[test]
    fn reads_the_name_of_a_real_client_hello() {
        let hello = client_hello("Allowed.Test");
        assert_eq!(parse(&hello), named("allowed.test"));
        // rustls sends no SNI for IP addresses.
        assert_eq!(
            parse(&client_hello("198.18.0.2")),
            Hello::Complete {
                name: None,
                ech: false
            }
        );
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let hello = client_hello("a.wild.test");
        for len in 0..hello.len() {
            assert_eq!(parse(&hello[..len]), Hello::Incomplete, "prefix {len}");
        }
    }

    #[test]
    fn reads_hellos_split_over_records() {
        let hello = client_hello("b.c.wild.test");
        for size in [1, 7, 100, 512] {
            let split = split_records(&hello, size);
            assert_eq!(parse(&split), named("b.c.wild.test"), "{size}");
            // Prefixes ending inside the records stay incomplete.
            assert_eq!(parse(&split[..split.len() - 1]), Hello::Incomplete);
        }
    }

    #[test]
    fn refuses_garbage() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Hello::Invalid(_)
        ));
        assert!(matches!(
            parse(b"SSH-2.0-OpenSSH_9.0\r\n"),
            Hello::Invalid(_)
        ));
        assert!(matches!(parse(&[22, 3, 1, 0, 0]), Hello::Invalid(_)));
        assert!(matches!(parse(&[22, 3, 1, 0x50, 0]), Hello::Invalid(_)));
        // A ServerHello (type 2) is not a ClientHello.
        assert!(matches!(
            parse(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
            Hello::Invalid(_)
        ));
        // A handshake header claiming more than 16 KiB.
        assert!(matches!(
            parse(&[22, 3, 1, 0, 4, 1, 1, 0, 0]),
            Hello::Invalid(_)
        ));
        // A hello whose declared length cuts its body short.
        let mut hello = client_hello("allowed.test");
        let len = u32::from_be_bytes([0, hello[6], hello[7], hello[8]]) - 1;
        hello[6..9].copy_from_slice(&len.to_be_bytes()[1..]);
        assert!(matches!(parse(&hello), Hello::Invalid(_)));
    }

    /// Builds a hello with the given extensions block.
    fn hello_with_extensions(exts: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&u16::try_from(exts.len()).unwrap().to_be_bytes());
        body.extend_from_slice(exts);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn sni_ext(names: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for n in names {
            list.push(0);
            list.extend_from_slice(&u16::try_from(n.len()).unwrap().to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    #[test]
    fn refuses_ambiguous_or_malformed_names() {
        let one = sni_ext(&[b"ok.test."]);
        assert_eq!(parse(&hello_with_extensions(&one)), named("ok.test"));
        let two = sni_ext(&[b"ok.test", b"evil.test"]);
        assert!(matches!(
            parse(&hello_with_extensions(&two)),
            Hello::Invalid(_)
        ));
        let mut twice = one.clone();
        twice.extend_from_slice(&sni_ext(&[b"evil.test"]));
        assert!(matches!(
            parse(&hello_with_extensions(&twice)),
            Hello::Invalid(_)
        ));
        for bad in [
            &b"a..test"[..],
            b"a b.test",
            b"\x00.test",
            b"",
            b"caf\xc3\xa9.test",
        ] {
            let h = hello_with_extensions(&sni_ext(&[bad]));
            assert!(matches!(parse(&h), Hello::Invalid(_)), "{bad:?}");
        }
        assert_eq!(
            parse(&hello_with_extensions(&[])),
            Hello::Complete {
                name: None,
                ech: false
            }
        );
    }

    /// An `encrypted_client_hello` extension (outer, with made-up
    /// contents: GREASE looks like this too).
    pub(crate) fn ech_ext() -> Vec<u8> {
        let data = [0u8, 0, 1, 0, 1, 7, 0, 2, 0xaa, 0xbb, 0, 1, 0xcc];
        let mut ext = ENCRYPTED_CLIENT_HELLO.to_be_bytes().to_vec();
        ext.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    /// A hello for `name` with an ECH extension.
    pub(crate) fn ech_hello(name: &str) -> Vec<u8> {
        let mut exts = sni_ext(&[name.as_bytes()]);
        exts.extend_from_slice(&ech_ext());
        hello_with_extensions(&exts)
    }

    #[test]
    fn notices_ech() {
        assert_eq!(
            parse(&ech_hello("public.test")),
            Hello::Complete {
                name: Some("public.test".into()),
                ech: true
            }
        );
    }
}
