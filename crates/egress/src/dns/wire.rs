//! The DNS message format (RFC 1035 section 4), as much of it as the
//! forwarder needs: parse a whole message, look at it, build one back.
//!
//! Parsing is bounds-checked everywhere and never trusts a count or a
//! length: a record count larger than the message simply runs out of bytes.
//! Names are decompressed on the way in. A compression pointer must point
//! strictly before the start of the run of labels it ends (every pointer a
//! real compressor writes does, since it can only refer to names already
//! written), so following pointers always moves backwards and ends; loops
//! and forward references are errors. Names longer than 255 bytes are
//! errors too.
//!
//! Record data that holds names (CNAME, NS, MX, SOA, SRV, ...) is stored
//! with those names expanded, because a compression pointer inside it is
//! only meaningful in the message it came from. Building writes owner names
//! compressed (exact-byte suffix match, so the case of every name is kept)
//! and record data as stored.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Longest name in wire form (RFC 1035 section 2.3.4).
pub(crate) const MAX_NAME_LEN: usize = 255;
/// Pointers followed while reading one name; the backwards rule already
/// bounds this, the cap only keeps a hostile message cheap.
const MAX_POINTERS: usize = 64;
/// Size of the fixed header.
pub(crate) const HEADER_LEN: usize = 12;

/// Record and query types the forwarder cares about.
pub(crate) mod rtype {
    /// IPv4 address.
    pub(crate) const A: u16 = 1;
    /// Alias.
    pub(crate) const CNAME: u16 = 5;
    /// Start of authority.
    pub(crate) const SOA: u16 = 6;
    /// IPv6 address.
    pub(crate) const AAAA: u16 = 28;
    /// EDNS pseudo-record (RFC 6891).
    pub(crate) const OPT: u16 = 41;
    /// Service binding (RFC 9460); may carry `ipv4hint`.
    pub(crate) const SVCB: u16 = 64;
    /// Service binding for HTTPS (RFC 9460); may carry `ipv4hint`.
    pub(crate) const HTTPS: u16 = 65;
}

/// The Internet class.
pub(crate) const CLASS_IN: u16 = 1;

/// Response codes (the low 4 bits of the flags).
pub(crate) mod rcode {
    /// No error.
    pub(crate) const NOERROR: u8 = 0;
    /// The query could not be parsed.
    pub(crate) const FORMERR: u8 = 1;
    /// The server failed.
    pub(crate) const SERVFAIL: u8 = 2;
    /// The name does not exist.
    pub(crate) const NXDOMAIN: u8 = 3;
    /// Not implemented (opcode).
    pub(crate) const NOTIMP: u8 = 4;
    /// Refused.
    pub(crate) const REFUSED: u8 = 5;
}

/// Flag bits of the header.
pub(crate) mod flag {
    /// This is a response.
    pub(crate) const QR: u16 = 0x8000;
    /// Truncated.
    pub(crate) const TC: u16 = 0x0200;
    /// Recursion desired.
    pub(crate) const RD: u16 = 0x0100;
    /// Recursion available.
    pub(crate) const RA: u16 = 0x0080;
    /// Checking disabled (DNSSEC).
    pub(crate) const CD: u16 = 0x0010;
    /// The opcode field.
    pub(crate) const OPCODE_MASK: u16 = 0x7800;
    /// The rcode field.
    pub(crate) const RCODE_MASK: u16 = 0x000f;
}

/// A message that cannot be parsed or built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    /// The message ends inside the named part.
    #[error("message truncated in {0}")]
    Truncated(&'static str),
    /// A compression pointer does not point backwards (a loop or a forward
    /// reference), or there are too many.
    #[error("bad compression pointer at offset {0}")]
    BadPointer(usize),
    /// A label length uses the reserved 0x40/0x80 prefixes.
    #[error("unsupported label type at offset {0}")]
    BadLabel(usize),
    /// A name is longer than 255 bytes.
    #[error("name longer than 255 bytes")]
    NameTooLong,
    /// Record data does not have the shape its type requires.
    #[error("malformed data of a type {0} record")]
    BadRdata(u16),
    /// Bytes are left after the last record.
    #[error("trailing bytes after the last record")]
    Trailing,
    /// A built message would exceed 65535 bytes, or a section 65535 records.
    #[error("message too large")]
    TooLarge,
}

/// A domain name in uncompressed wire form: length-prefixed labels ending
/// with the zero-length root label. The case is kept as received.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Name(Vec<u8>);

impl Name {
    /// The root name.
    pub(crate) fn root() -> Name {
        Name(vec![0])
    }

    /// Builds a name from dotted text (`a.example.com`, trailing dot
    /// optional); `None` when a label is empty or longer than 63 bytes, or
    /// the name is too long.
    #[cfg(test)]
    pub(crate) fn from_dotted(s: &str) -> Option<Name> {
        let s = s.strip_suffix('.').unwrap_or(s);
        let mut wire = Vec::with_capacity(s.len() + 2);
        if !s.is_empty() {
            for label in s.split('.') {
                let len = u8::try_from(label.len())
                    .ok()
                    .filter(|l| (1..=63).contains(l))?;
                wire.push(len);
                wire.extend_from_slice(label.as_bytes());
            }
        }
        wire.push(0);
        (wire.len() <= MAX_NAME_LEN).then_some(Name(wire))
    }

    /// The wire form.
    pub(crate) fn wire(&self) -> &[u8] {
        &self.0
    }

    /// The labels, without the root label.
    pub(crate) fn labels(&self) -> impl Iterator<Item = &[u8]> {
        let mut pos = 0;
        std::iter::from_fn(move || {
            let len = usize::from(*self.0.get(pos)?);
            if len == 0 {
                return None;
            }
            let label = self.0.get(pos + 1..pos + 1 + len)?;
            pos += 1 + len;
            Some(label)
        })
    }

    /// Case-insensitive equality (RFC 4343: ASCII letters only).
    pub(crate) fn eq_ignore_case(&self, other: &Name) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }

    /// The name as lowercase dotted text without a trailing dot, when
    /// every label is made of letters, digits, `-` and `_` only (anything
    /// else can match no policy entry and no certificate). The root is "".
    pub(crate) fn to_hostname(&self) -> Option<String> {
        let mut out = String::with_capacity(self.0.len());
        for label in self.labels() {
            if !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            {
                return None;
            }
            if !out.is_empty() {
                out.push('.');
            }
            for b in label {
                out.push(char::from(b.to_ascii_lowercase()));
            }
        }
        Some(out)
    }

    /// Printable form for logs: dotted, with unusual bytes escaped as
    /// `\DDD` (and `.` or `\` inside a label escaped with `\`).
    pub(crate) fn to_display(&self) -> String {
        let mut out = String::with_capacity(self.0.len());
        for label in self.labels() {
            if !out.is_empty() {
                out.push('.');
            }
            for &b in label {
                match b {
                    b'.' | b'\\' => {
                        out.push('\\');
                        out.push(char::from(b));
                    }
                    0x21..=0x7e => out.push(char::from(b)),
                    _ => {
                        let _ = write!(out, "\\{b:03}");
                    }
                }
            }
        }
        if out.is_empty() {
            out.push('.');
        }
        out
    }
}

/// The question of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Question {
    /// Name asked about.
    pub(crate) name: Name,
    /// Query type.
    pub(crate) qtype: u16,
    /// Query class.
    pub(crate) qclass: u16,
}

/// A resource record; `rdata` holds any names it contains in expanded form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// Owner name.
    pub(crate) name: Name,
    /// Type.
    pub(crate) rtype: u16,
    /// Class (for OPT: the sender's UDP payload size).
    pub(crate) class: u16,
    /// Time to live in seconds (for OPT: extended rcode and flags).
    pub(crate) ttl: u32,
    /// Record data, names expanded.
    pub(crate) rdata: Vec<u8>,
}

impl Record {
    /// The address of an A record of class IN.
    pub(crate) fn a_addr(&self) -> Option<Ipv4Addr> {
        if self.rtype != rtype::A || self.class != CLASS_IN {
            return None;
        }
        let octets: [u8; 4] = self.rdata.as_slice().try_into().ok()?;
        Some(Ipv4Addr::from(octets))
    }

    /// The target of a CNAME record of class IN.
    pub(crate) fn cname_target(&self) -> Option<Name> {
        if self.rtype != rtype::CNAME || self.class != CLASS_IN {
            return None;
        }
        // Stored expanded by `parse`, so the data is exactly one name.
        let mut pos = 0;
        let name = read_name(&self.rdata, &mut pos).ok()?;
        (pos == self.rdata.len()).then_some(name)
    }
}

/// A whole message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Message {
    /// Transaction id.
    pub(crate) id: u16,
    /// Flags: QR, opcode, AA, TC, RD, RA, Z, AD, CD, rcode.
    pub(crate) flags: u16,
    /// Question section.
    pub(crate) questions: Vec<Question>,
    /// Answer section.
    pub(crate) answers: Vec<Record>,
    /// Authority section.
    pub(crate) authority: Vec<Record>,
    /// Additional section (holds the OPT pseudo-record, if any).
    pub(crate) additional: Vec<Record>,
}

impl Message {
    /// Parses a whole message; bytes after the last record are an error.
    pub(crate) fn parse(msg: &[u8]) -> Result<Message, WireError> {
        let mut pos = 0;
        let id = read_u16(msg, &mut pos, "header")?;
        let flags = read_u16(msg, &mut pos, "header")?;
        let qd = read_u16(msg, &mut pos, "header")?;
        let an = read_u16(msg, &mut pos, "header")?;
        let ns = read_u16(msg, &mut pos, "header")?;
        let ar = read_u16(msg, &mut pos, "header")?;
        let mut m = Message {
            id,
            flags,
            ..Message::default()
        };
        for _ in 0..qd {
            let name = read_name(msg, &mut pos)?;
            let qtype = read_u16(msg, &mut pos, "question")?;
            let qclass = read_u16(msg, &mut pos, "question")?;
            m.questions.push(Question {
                name,
                qtype,
                qclass,
            });
        }
        for (count, section) in [
            (an, &mut m.answers),
            (ns, &mut m.authority),
            (ar, &mut m.additional),
        ] {
            for _ in 0..count {
                section.push(read_record(msg, &mut pos)?);
            }
        }
        if pos != msg.len() {
            return Err(WireError::Trailing);
        }
        Ok(m)
    }

    /// The opcode (0 is a standard query).
    pub(crate) fn opcode(&self) -> u8 {
        // Four bits: the conversion cannot fail.
        u8::try_from((self.flags & flag::OPCODE_MASK) >> 11).unwrap_or(u8::MAX)
    }

    /// The response code (the header's 4 bits; extended rcodes ignored).
    pub(crate) fn rcode(&self) -> u8 {
        // Four bits: the conversion cannot fail.
        u8::try_from(self.flags & flag::RCODE_MASK).unwrap_or(u8::MAX)
    }

    /// Sets the response code.
    pub(crate) fn set_rcode(&mut self, rcode: u8) {
        self.flags = (self.flags & !flag::RCODE_MASK) | (u16::from(rcode) & flag::RCODE_MASK);
    }

    /// The EDNS pseudo-record, if any.
    pub(crate) fn opt(&self) -> Option<&Record> {
        self.additional.iter().find(|r| r.rtype == rtype::OPT)
    }

    /// An empty response to `query` with `rcode`: same id, opcode, RD and
    /// CD, the question copied, RA set, and an OPT record (no options) when
    /// the query had one.
    pub(crate) fn response_to(query: &Message, rcode: u8) -> Message {
        let mut m = Message {
            id: query.id,
            flags: flag::QR | flag::RA | (query.flags & (flag::OPCODE_MASK | flag::RD | flag::CD)),
            questions: query.questions.clone(),
            ..Message::default()
        };
        m.set_rcode(rcode);
        if query.opt().is_some() {
            m.additional.push(opt_record(EDNS_PAYLOAD));
        }
        m
    }

    /// Builds the wire form, compressing owner and question names.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, WireError> {
        let count = |n: usize| u16::try_from(n).map_err(|_| WireError::TooLarge);
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for n in [
            self.questions.len(),
            self.answers.len(),
            self.authority.len(),
            self.additional.len(),
        ] {
            out.extend_from_slice(&count(n)?.to_be_bytes());
        }
        let mut names = Compressor::default();
        for q in &self.questions {
            names.write(&mut out, &q.name);
            out.extend_from_slice(&q.qtype.to_be_bytes());
            out.extend_from_slice(&q.qclass.to_be_bytes());
        }
        for r in self
            .answers
            .iter()
            .chain(&self.authority)
            .chain(&self.additional)
        {
            names.write(&mut out, &r.name);
            out.extend_from_slice(&r.rtype.to_be_bytes());
            out.extend_from_slice(&r.class.to_be_bytes());
            out.extend_from_slice(&r.ttl.to_be_bytes());
            out.extend_from_slice(&count(r.rdata.len())?.to_be_bytes());
            out.extend_from_slice(&r.rdata);
        }
        if out.len() > usize::from(u16::MAX) {
            return Err(WireError::TooLarge);
        }
        Ok(out)
    }
}

/// UDP payload size the forwarder announces (the DNS flag day 2020 value,
/// which avoids IP fragmentation on common paths).
pub(crate) const EDNS_PAYLOAD: u16 = 1232;

/// An OPT pseudo-record announcing `payload` bytes, version 0, no flags.
pub(crate) fn opt_record(payload: u16) -> Record {
    Record {
        name: Name::root(),
        rtype: rtype::OPT,
        class: payload,
        ttl: 0,
        rdata: Vec::new(),
    }
}

/// Remembers where names were written, for compression pointers.
#[derive(Default)]
struct Compressor {
    /// Exact wire bytes of a name suffix -> its offset in the message.
    seen: HashMap<Vec<u8>, u16>,
}

impl Compressor {
    fn write(&mut self, out: &mut Vec<u8>, name: &Name) {
        let wire = name.wire();
        let mut pos = 0;
        while wire.get(pos).is_some_and(|&l| l != 0) {
            let suffix = &wire[pos..];
            if let Some(&offset) = self.seen.get(suffix) {
                out.extend_from_slice(&(0xc000 | offset).to_be_bytes());
                return;
            }
            // Only offsets that fit the 14-bit pointer can be referred to.
            if let Ok(offset) = u16::try_from(out.len()) {
                if offset < 0x4000 {
                    self.seen.insert(suffix.to_vec(), offset);
                }
            }
            let len = usize::from(wire[pos]);
            out.extend_from_slice(&wire[pos..pos + 1 + len]);
            pos += 1 + len;
        }
        out.push(0);
    }
}

fn read_u16(msg: &[u8], pos: &mut usize, what: &'static str) -> Result<u16, WireError> {
    let b = msg.get(*pos..*pos + 2).ok_or(WireError::Truncated(what))?;
    *pos += 2;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn read_u32(msg: &[u8], pos: &mut usize, what: &'static str) -> Result<u32, WireError> {
    let b = msg.get(*pos..*pos + 4).ok_or(WireError::Truncated(what))?;
    *pos += 4;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads a possibly compressed name at `*pos` and moves `*pos` past it
/// (past the first pointer, if any).
pub(crate) fn read_name(msg: &[u8], pos: &mut usize) -> Result<Name, WireError> {
    let mut wire = Vec::with_capacity(32);
    // Where the current run of labels began; a pointer must go before it.
    let mut run_start = *pos;
    let mut cursor = *pos;
    let mut resume: Option<usize> = None;
    let mut pointers = 0;
    loop {
        let len = *msg.get(cursor).ok_or(WireError::Truncated("name"))?;
        match len & 0xc0 {
            0x00 => {
                let len = usize::from(len);
                let label = msg
                    .get(cursor..cursor + 1 + len)
                    .ok_or(WireError::Truncated("name"))?;
                wire.extend_from_slice(label);
                // Leave room for the root label unless this was it.
                if wire.len() + usize::from(len != 0) > MAX_NAME_LEN {
                    return Err(WireError::NameTooLong);
                }
                cursor += 1 + len;
                if len == 0 {
                    *pos = resume.unwrap_or(cursor);
                    return Ok(Name(wire));
                }
            }
            0xc0 => {
                let low = *msg.get(cursor + 1).ok_or(WireError::Truncated("name"))?;
                let target = usize::from(len & 0x3f) << 8 | usize::from(low);
                pointers += 1;
                if target >= run_start || pointers > MAX_POINTERS {
                    return Err(WireError::BadPointer(cursor));
                }
                resume.get_or_insert(cursor + 2);
                run_start = target;
                cursor = target;
            }
            _ => return Err(WireError::BadLabel(cursor)),
        }
    }
}

/// How names sit in a type's record data (RFC 1035 3.3, RFC 2782, RFC
/// 1183, RFC 2230, RFC 6672): a prefix of fixed bytes, then names, then
/// fixed bytes. Types not listed are copied as opaque bytes (RFC 3597 forbids
/// compression in newer types).
fn rdata_layout(rtype: u16) -> Option<(usize, usize, usize)> {
    // (fixed bytes before, names, fixed bytes after)
    match rtype {
        // NS, MD, MF, CNAME, MB, MG, MR, PTR, DNAME
        2 | 3 | 4 | 5 | 7 | 8 | 9 | 12 | 39 => Some((0, 1, 0)),
        // SOA: mname, rname, serial, refresh, retry, expire, minimum
        6 => Some((0, 2, 20)),
        // MINFO, RP
        14 | 17 => Some((0, 2, 0)),
        // MX, AFSDB, RT, KX: preference then a name
        15 | 18 | 21 | 36 => Some((2, 1, 0)),
        // SRV: priority, weight, port, target
        33 => Some((6, 1, 0)),
        _ => None,
    }
}

fn read_record(msg: &[u8], pos: &mut usize) -> Result<Record, WireError> {
    let name = read_name(msg, pos)?;
    let rtype = read_u16(msg, pos, "record")?;
    let class = read_u16(msg, pos, "record")?;
    let ttl = read_u32(msg, pos, "record")?;
    let rdlen = usize::from(read_u16(msg, pos, "record")?);
    let start = *pos;
    let end = start + rdlen;
    let raw = msg
        .get(start..end)
        .ok_or(WireError::Truncated("record data"))?;
    let rdata = match rdata_layout(rtype) {
        None => raw.to_vec(),
        Some((before, names, after)) => {
            let mut out = Vec::with_capacity(rdlen + 16);
            let mut p = start;
            let fixed = msg
                .get(p..p + before)
                .filter(|_| p + before <= end)
                .ok_or(WireError::BadRdata(rtype))?;
            out.extend_from_slice(fixed);
            p += before;
            for _ in 0..names {
                // Names are read against the whole message (they may point
                // anywhere before), but must not run past this record.
                let n = read_name(msg, &mut p)?;
                if p > end {
                    return Err(WireError::BadRdata(rtype));
                }
                out.extend_from_slice(n.wire());
            }
            if p + after != end {
                return Err(WireError::BadRdata(rtype));
            }
            out.extend_from_slice(&msg[p..end]);
            out
        }
    };
    if rtype == rtype::A && class == CLASS_IN && rdata.len() != 4 {
        return Err(WireError::BadRdata(rtype));
    }
    *pos = end;
    Ok(Record {
        name,
        rtype,
        class,
        ttl,
        rdata,
    })
}

/// The fixed header fields of a message that may not parse as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// Transaction id.
    pub(crate) id: u16,
    /// Flags.
    pub(crate) flags: u16,
}

impl Header {
    /// Reads the first 4 bytes; `None` when the message is shorter than a
    /// header.
    pub(crate) fn peek(msg: &[u8]) -> Option<Header> {
        if msg.len() < HEADER_LEN {
            return None;
        }
        Some(Header {
            id: u16::from_be_bytes([msg[0], msg[1]]),
            flags: u16::from_be_bytes([msg[2], msg[3]]),
        })
    }
}

/// Replaces the id of an encoded message in place (no-op when too short).
pub(crate) fn set_id(msg: &mut [u8], id: u16) {
    if let Some(b) = msg.get_mut(0..2) {
        b.copy_from_slice(&id.to_be_bytes());
    }
}

/// A response that fits in `limit` bytes: `encoded` itself, or the header
/// and question only with TC set, so the client retries over TCP (RFC 1035
/// 4.2.1). The OPT record is kept when it fits.
pub(crate) fn fit(msg: &Message, encoded: Vec<u8>, limit: usize) -> Result<Vec<u8>, WireError> {
    if encoded.len() <= limit {
        return Ok(encoded);
    }
    let mut small = Message {
        id: msg.id,
        flags: msg.flags | flag::TC,
        questions: msg.questions.clone(),
        ..Message::default()
    };
    small.additional.extend(msg.opt().cloned());
    small.encode()
}

/// The largest UDP response the sender of `query` accepts: its EDNS payload
/// size (at least 512), or 512 without EDNS.
pub(crate) fn udp_limit(query: &Message) -> usize {
    query.opt().map_or(512, |o| usize::from(o.class).max(512))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn name(s: &str) -> Name {
        Name::from_dotted(s).unwrap()
    }

    pub(crate) fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record {
            name: name(owner),
            rtype: rtype::A,
            class: CLASS_IN,
            ttl,
            rdata: ip.to_vec(),
        }
    }

    pub(crate) fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record {
            name: name(owner),
            rtype: rtype::CNAME,
            class: CLASS_IN,
            ttl,
            rdata: name(target).wire().to_vec(),
        }
    }

    pub(crate) fn query(id: u16, qname: &str, qtype: u16) -> Message {
        Message {
            id,
            flags: flag::RD,
            questions: vec![Question {
                name: name(qname),
                qtype,
                qclass: CLASS_IN,
            }],
            ..Message::default()
        }
    }

    fn soa(owner: &str) -> Record {
        let mut rdata = name("ns1.example.com").wire().to_vec();
        rdata.extend_from_slice(name("hostmaster.example.com").wire());
        rdata.extend_from_slice(&[0; 20]);
        Record {
            name: name(owner),
            rtype: rtype::SOA,
            class: CLASS_IN,
            ttl: 300,
            rdata,
        }
    }

    #[test]
    fn round_trips_and_compresses() {
        let mut m = Message::response_to(&query(7, "www.Example.com", rtype::A), rcode::NOERROR);
        m.answers
            .push(cname("www.Example.com", 30, "edge.example.com"));
        m.answers
            .push(a("edge.example.com", 60, [93, 184, 216, 34]));
        m.authority.push(soa("example.com"));
        m.additional.push(opt_record(1232));
        let wire = m.encode().unwrap();
        let back = Message::parse(&wire).unwrap();
        assert_eq!(back, m);
        // The answer's owner is a pointer to the question's name.
        let q_end = HEADER_LEN + name("www.Example.com").wire().len() + 4;
        assert_eq!(&wire[q_end..q_end + 2], &[0xc0, 12]);
        // And compressed output is smaller than the names written out.
        let plain: usize = 12
            + back
                .questions
                .iter()
                .map(|q| q.name.wire().len() + 4)
                .sum::<usize>()
            + back
                .answers
                .iter()
                .chain(&back.authority)
                .chain(&back.additional)
                .map(|r| r.name.wire().len() + 10 + r.rdata.len())
                .sum::<usize>();
        assert!(wire.len() < plain);
        assert_eq!(
            back.answers[0].cname_target(),
            Some(name("edge.example.com"))
        );
        assert_eq!(
            back.answers[1].a_addr(),
            Some(Ipv4Addr::new(93, 184, 216, 34))
        );
        assert_eq!(
            back.questions[0].name.to_hostname().unwrap(),
            "www.example.com"
        );
    }

    /// A hand-written message whose CNAME data and MX data use pointers.
    #[test]
    fn expands_pointers_inside_record_data() {
        let mut msg = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        // question: a.test A IN at offset 12
        msg.extend_from_slice(&[1, b'a', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1]);
        // answer 1: owner -> 12, CNAME, data "b" + pointer to "test" (14)
        msg.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 4, 1, b'b', 0xc0, 14]);
        // answer 2: owner -> "test" (14), MX 10 pointer -> a.test (12)
        msg.extend_from_slice(&[0xc0, 14, 0, 15, 0, 1, 0, 0, 0, 60, 0, 4, 0, 10, 0xc0, 12]);
        let m = Message::parse(&msg).unwrap();
        assert_eq!(m.id, 0x1234);
        assert_eq!(m.answers[0].cname_target(), Some(name("b.test")));
        let mut mx = vec![0, 10];
        mx.extend_from_slice(name("a.test").wire());
        assert_eq!(m.answers[1].rdata, mx);
        // Rebuilt and parsed again: the same message.
        assert_eq!(Message::parse(&m.encode().unwrap()).unwrap(), m);
    }

    #[test]
    fn refuses_pointer_loops_and_forward_pointers() {
        // Question name is a pointer to itself.
        let mut msg = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1];
        assert_eq!(Message::parse(&msg), Err(WireError::BadPointer(12)));
        // Two labels pointing at each other: "x" then pointer to 16, where a
        // pointer leads back to 12.
        msg = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(&[1, b'x', 0xc0, 16, 0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(
            Message::parse(&msg),
            Err(WireError::BadPointer(_))
        ));
        // Pointer past the end.
        msg = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 1, 0, 1];
        assert!(matches!(
            Message::parse(&msg),
            Err(WireError::BadPointer(_))
        ));
        // Reserved label type.
        msg = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 1, 0, 1];
        assert_eq!(Message::parse(&msg), Err(WireError::BadLabel(12)));
    }

    #[test]
    fn refuses_truncated_and_oversized_input() {
        let mut m = query(1, "example.com", rtype::A);
        m.flags |= flag::QR;
        m.answers.push(a("example.com", 5, [1, 2, 3, 4]));
        let wire = m.encode().unwrap();
        for len in 0..wire.len() {
            assert!(
                Message::parse(&wire[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
        let mut long = wire.clone();
        long.push(0);
        assert_eq!(Message::parse(&long), Err(WireError::Trailing));
        // A record count far beyond the bytes present.
        let mut counts = wire.clone();
        counts[6] = 0xff;
        assert!(matches!(
            Message::parse(&counts),
            Err(WireError::Truncated(_))
        ));
        // An A record with 5 bytes of data.
        let mut bad = wire;
        let n = bad.len();
        bad[n - 5] = 5;
        bad.push(9);
        assert_eq!(Message::parse(&bad), Err(WireError::BadRdata(rtype::A)));
        // Names over 255 bytes, built with labels of 63 bytes.
        let label = "a".repeat(63);
        assert!(Name::from_dotted(&[label.as_str(); 4].join(".")).is_none());
        let mut msg = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..5 {
            msg.push(63);
            msg.extend_from_slice(label.as_bytes());
        }
        msg.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(Message::parse(&msg), Err(WireError::NameTooLong));
        // Exactly 255 bytes with the root label is the longest legal name.
        let longest = [label.as_str(), &label, &label, &"b".repeat(61)].join(".");
        let q = query(1, &longest, rtype::A);
        assert_eq!(q.questions[0].name.wire().len(), 255);
        assert_eq!(Message::parse(&q.encode().unwrap()).unwrap(), q);
        let too_long = [label.as_str(), &label, &label, &"b".repeat(62)].join(".");
        assert!(Name::from_dotted(&too_long).is_none());
    }

    #[test]
    fn names_print_and_compare() {
        let n = name("WWW.Example.COM.");
        assert!(n.eq_ignore_case(&name("www.example.com")));
        assert_eq!(n.to_hostname().unwrap(), "www.example.com");
        assert_eq!(n.to_display(), "WWW.Example.COM");
        assert_eq!(Name::root().to_display(), ".");
        assert_eq!(Name::root().to_hostname().unwrap(), "");
        let odd = Name(vec![3, b'a', b'.', 0xff, 3, b'c', b'o', b'm', 0]);
        assert_eq!(odd.to_hostname(), None);
        assert_eq!(odd.to_display(), "a\\.\\255.com");
    }

    #[test]
    fn fits_a_size_limit_by_truncating() {
        let q = query(9, "big.example", rtype::A);
        let mut r = Message::response_to(&q, rcode::NOERROR);
        for i in 0..100u8 {
            r.answers.push(a("big.example", 60, [10, 0, 0, i]));
        }
        let wire = r.encode().unwrap();
        assert!(wire.len() > 512);
        let small = fit(&r, wire.clone(), udp_limit(&q)).unwrap();
        let s = Message::parse(&small).unwrap();
        assert!(s.flags & flag::TC != 0);
        assert!(s.answers.is_empty());
        assert_eq!(s.questions, q.questions);
        assert_eq!(fit(&r, wire.clone(), 65535).unwrap(), wire);
        let mut edns = q;
        edns.additional.push(opt_record(4096));
        assert_eq!(udp_limit(&edns), 4096);
    }

    #[test]
    fn response_keeps_id_question_and_edns() {
        let mut q = query(77, "x.example", rtype::AAAA);
        q.flags |= flag::CD;
        q.additional.push(opt_record(4096));
        let r = Message::response_to(&q, rcode::NXDOMAIN);
        assert_eq!(r.id, 77);
        assert_eq!(r.rcode(), rcode::NXDOMAIN);
        assert_eq!(r.opcode(), 0);
        assert!(r.flags & flag::QR != 0 && r.flags & flag::RD != 0 && r.flags & flag::CD != 0);
        assert_eq!(r.questions, q.questions);
        assert_eq!(r.opt().unwrap().class, EDNS_PAYLOAD);
        let mut wire = r.encode().unwrap();
        set_id(&mut wire, 5);
        assert_eq!(Header::peek(&wire).unwrap().id, 5);
        assert_eq!(Header::peek(&wire[..11]), None);
    }
}
