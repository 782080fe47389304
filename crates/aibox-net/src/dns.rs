//! The in-sandbox DNS answerer. It never forwards a query anywhere: a name
//! some rule allows gets a synthetic loopback address (stable for the
//! sandbox's life), which the transparent listeners map back to the name;
//! every other name is NXDOMAIN. So tools that ignore proxy variables still
//! reach allowed hosts through the proxy, and DNS cannot carry data out.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use crate::host::{Host, parse_host};
use crate::rules::Allowlist;

/// First two octets of the synthetic addresses (127.100.0.0/16).
pub const SYNTHETIC_PREFIX: [u8; 2] = [127, 100];

/// Name ↔ synthetic address table of one sandbox.
#[derive(Debug, Default)]
pub struct Synthetic {
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, String>,
}

impl Synthetic {
    /// The address for `name`, allocating one on first use; None when the
    /// 65 534 addresses are used up.
    pub fn address(&mut self, name: &str) -> Option<Ipv4Addr> {
        if let Some(a) = self.by_name.get(name) {
            return Some(*a);
        }
        let n = self.by_name.len() as u32 + 1;
        if n > 0xfffe {
            return None;
        }
        let a = Ipv4Addr::new(
            SYNTHETIC_PREFIX[0],
            SYNTHETIC_PREFIX[1],
            (n >> 8) as u8,
            n as u8,
        );
        self.by_name.insert(name.to_string(), a);
        self.by_addr.insert(a, name.to_string());
        Some(a)
    }

    /// The name a synthetic address stands for.
    pub fn name(&self, addr: Ipv4Addr) -> Option<&str> {
        self.by_addr.get(&addr).map(String::as_str)
    }
}

/// The result of one query: the reply to send (None: drop the packet) and
/// what to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Wire-format reply.
    pub reply: Option<Vec<u8>>,
    /// The queried name (canonical when it parsed, else as received).
    pub name: String,
    /// Query type, e.g. `A`.
    pub qtype: String,
    /// Response code, e.g. `NXDomain`.
    pub rcode: String,
    /// The synthetic address given, if any.
    pub address: Option<Ipv4Addr>,
}

/// Answers one DNS message.
pub fn answer(query: &[u8], allow: &Allowlist, synth: &mut Synthetic) -> Answer {
    let mut out = Answer {
        reply: None,
        name: String::new(),
        qtype: String::new(),
        rcode: String::new(),
        address: None,
    };
    let Ok(msg) = Message::from_vec(query) else {
        out.rcode = "dropped (malformed)".into();
        // Answer FORMERR when at least the id is there, so clients stop.
        if query.len() >= 2 {
            let id = u16::from_be_bytes([query[0], query[1]]);
            out.reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok();
            out.rcode = "FormErr".into();
        }
        return out;
    };
    if msg.metadata.message_type != MessageType::Query {
        out.rcode = "dropped (not a query)".into();
        return out;
    }
    let id = msg.metadata.id;
    let mut reply = Message::response(id, msg.metadata.op_code);
    reply.metadata.recursion_desired = msg.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    let code = if msg.metadata.op_code != OpCode::Query {
        ResponseCode::NotImp
    } else if msg.queries.len() != 1 {
        ResponseCode::FormErr
    } else {
        let q = &msg.queries[0];
        reply.add_query(q.clone());
        out.qtype = q.query_type().to_string();
        let raw = q.name().to_ascii();
        match parse_host(&raw) {
            Ok(Host::Name(name)) if allow.knows_name(&name) => {
                out.name = name.clone();
                if q.query_type() == RecordType::A {
                    match synth.address(&name) {
                        Some(a) => {
                            out.address = Some(a);
                            reply.add_answer(Record::from_rdata(
                                q.name().clone(),
                                60,
                                RData::A(A(a)),
                            ));
                            ResponseCode::NoError
                        }
                        None => ResponseCode::ServFail,
                    }
                } else {
                    // Allowed name, no records of this type (AAAA included:
                    // clients fall back to the A answer).
                    ResponseCode::NoError
                }
            }
            Ok(h) => {
                out.name = h.to_string();
                ResponseCode::NXDomain
            }
            Err(_) => {
                out.name = raw;
                ResponseCode::NXDomain
            }
        }
    };
    reply.metadata.response_code = code;
    out.rcode = format!("{code:?}");
    out.reply = reply.to_vec().ok();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::collections::BTreeMap;
    use std::str::FromStr;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0, MessageType::Query, OpCode::Query);
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        let n = Name::from_str(name).unwrap_or_else(|e| panic!("{e}"));
        m.add_query(Query::query(n, t));
        m.to_vec().unwrap_or_default()
    }

    fn allowlist() -> Allowlist {
        Allowlist::parse(&["api.github.com", "*.npmjs.org"], &BTreeMap::new())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn allowed_names_get_stable_synthetic_addresses() {
        let (l, mut s) = (allowlist(), Synthetic::default());
        let a = answer(&query("API.GitHub.com.", RecordType::A), &l, &mut s);
        assert_eq!(a.rcode, "NoError");
        assert_eq!(a.address, Some(Ipv4Addr::new(127, 100, 0, 1)));
        let b = answer(&query("registry.npmjs.org.", RecordType::A), &l, &mut s);
        assert_eq!(b.address, Some(Ipv4Addr::new(127, 100, 0, 2)));
        let again = answer(&query("api.github.com.", RecordType::A), &l, &mut s);
        assert_eq!(again.address, a.address);
        assert_eq!(
            s.name(Ipv4Addr::new(127, 100, 0, 2)),
            Some("registry.npmjs.org")
        );
        let reply =
            Message::from_vec(&again.reply.unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reply.metadata.id, 4242);
        assert_eq!(reply.answers.len(), 1);
        // Other types: no data, no error.
        for t in [RecordType::AAAA, RecordType::TXT, RecordType::MX] {
            let o = answer(&query("api.github.com.", t), &l, &mut s);
            assert_eq!((o.rcode.as_str(), o.address), ("NoError", None), "{t}");
        }
    }

    #[test]
    fn everything_else_is_nxdomain() {
        let (l, mut s) = (allowlist(), Synthetic::default());
        for n in [
            "evil.com.",
            "npmjs.org.",
            "mfzwizltoq.attacker.tld.",
            "api.github.com.evil.com.",
        ] {
            for t in [RecordType::A, RecordType::AAAA, RecordType::TXT] {
                let o = answer(&query(n, t), &l, &mut s);
                assert_eq!(o.rcode, "NXDomain", "{n} {t}");
                assert_eq!(o.address, None);
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let (l, mut s) = (allowlist(), Synthetic::default());
        assert_eq!(answer(&[], &l, &mut s).reply, None);
        assert_eq!(answer(&[1, 2, 3], &l, &mut s).rcode, "FormErr");
        let good = query("api.github.com.", RecordType::A);
        for i in 0..good.len() {
            let mut c = good.clone();
            c[i] ^= 0xff;
            let _ = answer(&c, &l, &mut s);
        }
    }
}
