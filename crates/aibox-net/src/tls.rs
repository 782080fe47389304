//! Reads the server name (SNI) from the first TLS ClientHello of a
//! connection, so the proxy can check it against the destination it
//! already approved (SNI spoofing, domain fronting at the TLS layer).

/// Largest ClientHello we are willing to buffer.
pub const MAX_HELLO: usize = 64 * 1024;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not a TLS handshake at all.
    NotTls,
    /// More bytes are needed.
    Incomplete,
    /// A complete ClientHello and the server name it names, if any.
    Sni(Option<String>),
    /// An Encrypted ClientHello: the real server name is hidden.
    Encrypted,
    /// Starts like TLS but is not a valid ClientHello.
    Malformed,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| (b[0] as usize) << 8 | b[1] as usize)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// Examines the bytes received so far.
pub fn client_hello(buf: &[u8]) -> Hello {
    if buf.is_empty() {
        return Hello::Incomplete;
    }
    if buf[0] != 0x16 {
        return Hello::NotTls;
    }
    // Reassemble the handshake message from as many records as it spans.
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return Hello::Incomplete;
        }
        if rest[0] != 0x16 || rest[1] != 3 {
            return Hello::Malformed;
        }
        let len = (rest[3] as usize) << 8 | rest[4] as usize;
        if len == 0 || len > 16384 + 256 {
            return Hello::Malformed;
        }
        if rest.len() < 5 + len {
            return Hello::Incomplete;
        }
        handshake.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if handshake.len() >= 4 {
            if handshake[0] != 1 {
                return Hello::Malformed;
            }
            let need = (handshake[1] as usize) << 16
                | (handshake[2] as usize) << 8
                | handshake[3] as usize;
            if need + 4 > MAX_HELLO {
                return Hello::Malformed;
            }
            if handshake.len() >= need + 4 {
                return parse_body(&handshake[4..need + 4]);
            }
        }
    }
}

fn parse_body(body: &[u8]) -> Hello {
    let mut r = Reader { buf: body };
    let parsed = (|| {
        r.take(2 + 32)?; // legacy version, random
        r.vec8()?; // session id
        r.vec16()?; // cipher suites
        r.vec8()?; // compression methods
        if r.buf.is_empty() {
            return Some(Hello::Sni(None));
        }
        let mut ext = Reader { buf: r.vec16()? };
        let mut sni = None;
        while !ext.buf.is_empty() {
            let kind = ext.u16()?;
            let data = ext.vec16()?;
            match kind {
                0 => {
                    let mut list = Reader { buf: data };
                    let mut names = Reader { buf: list.vec16()? };
                    while !names.buf.is_empty() {
                        let name_type = names.u8()?;
                        let name = names.vec16()?;
                        if name_type == 0 {
                            if sni.is_some() {
                                return Some(Hello::Malformed);
                            }
                            sni = Some(String::from_utf8(name.to_vec()).ok()?);
                        }
                    }
                }
                0xfe0d | 0xffce => return Some(Hello::Encrypted),
                _ => {}
            }
        }
        Some(Hello::Sni(sni))
    })();
    parsed.unwrap_or(Hello::Malformed)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello with the given extensions.
    pub(crate) fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        let mut ext = Vec::new();
        for (t, d) in extensions {
            ext.extend(t.to_be_bytes());
            ext.extend((d.len() as u16).to_be_bytes());
            ext.extend(d);
        }
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    pub(crate) fn sni_ext(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name.as_bytes());
        let mut d = (entry.len() as u16).to_be_bytes().to_vec();
        d.extend(entry);
        (0, d)
    }

    #[test]
    fn finds_the_server_name() {
        let h = hello(&[(10, vec![0, 2, 0, 29]), sni_ext("api.github.com")]);
        assert_eq!(client_hello(&h), Hello::Sni(Some("api.github.com".into())));
        for cut in [0, 1, 4, 5, 20, h.len() - 1] {
            assert_eq!(client_hello(&h[..cut]), Hello::Incomplete, "cut {cut}");
        }
        assert_eq!(client_hello(&hello(&[])), Hello::Sni(None));
    }

    #[test]
    fn split_records_are_reassembled() {
        let h = hello(&[sni_ext("a.example")]);
        let payload = &h[5..];
        let (a, b) = payload.split_at(10);
        let mut split = vec![0x16, 3, 1];
        split.extend((a.len() as u16).to_be_bytes());
        split.extend(a);
        split.extend([0x16, 3, 1]);
        split.extend((b.len() as u16).to_be_bytes());
        split.extend(b);
        assert_eq!(client_hello(&split), Hello::Sni(Some("a.example".into())));
    }

    #[test]
    fn odd_inputs_never_panic() {
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(
            client_hello(&hello(&[(0xfe0d, vec![1, 2, 3])])),
            Hello::Encrypted
        );
        assert_eq!(
            client_hello(&hello(&[sni_ext("a.example"), sni_ext("b.example")])),
            Hello::Malformed
        );
        let mut h = hello(&[sni_ext("a.example")]);
        let n = h.len();
        h[n - 3] = 0xff; // name length beyond the data
        assert!(matches!(
            client_hello(&h),
            Hello::Malformed | Hello::Incomplete
        ));
        // Every truncation and every single-byte corruption is handled.
        let good = hello(&[sni_ext("x.example")]);
        for i in 0..good.len() {
            for v in [0u8, 0xff] {
                let mut c = good.clone();
                c[i] = v;
                let _ = client_hello(&c);
            }
        }
    }
}
