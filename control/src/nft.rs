//! nftables through its netlink interface (nf_tables over nfnetlink), in-process: one batch,
//! applied by the kernel as one transaction, as `nft -f` sends it. Only what podwire's rules
//! need: `--ip-masq`'s table (a table, a base chain on a hook, rules of payload/meta matches,
//! `return` and `masquerade`) and the FORWARD accept rules it keeps in iptables-nft's chain
//! (rules listed, appended and deleted by handle), with comments as nft and iptables-nft
//! write them (so `nft list` and `iptables -S` show them).

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use podwire_dataplane::route::Ipv4Net;
use std::net::Ipv4Addr;

/// Why the kernel refused a batch.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nfnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error("nftables refused {what}: {source}")]
    Kernel {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("nftables answered a listing with a malformed message")]
    Malformed,
    #[error("the rule set changed during the listing")]
    Interrupted,
}

impl NftError {
    /// The kernel said the table or chain is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, NftError::Kernel { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const AF_INET: u8 = 2;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
/// The register matches load into (`NFT_REG_1`), and the verdict register.
const REG_1: u32 = 1;
const REG_VERDICT: u32 = 0;
const NF_INET_POST_ROUTING: u32 = 4;
/// `srcnat`'s priority.
const PRIORITY_SRCNAT: i32 = 100;
const NF_ACCEPT: u32 = 1;
const NFT_RETURN: i32 = -5;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 1 << 4;
/// `NFTNL_UDATA_RULE_COMMENT`, the comment's type in a rule's user data.
const UDATA_RULE_COMMENT: u8 = 0;

/// One netlink attribute, padded to 4 bytes.
fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut v = Vec::with_capacity(len.next_multiple_of(4));
    v.extend_from_slice(&(len as u16).to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(payload);
    v.resize(len.next_multiple_of(4), 0);
    v
}

fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
    attr(kind | NLA_F_NESTED, &parts.concat())
}

fn be32(kind: u16, v: u32) -> Vec<u8> {
    attr(kind, &v.to_be_bytes())
}

fn string(kind: u16, s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    attr(kind, &v)
}

/// A field of an IPv4 packet to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Saddr,
    Daddr,
}

/// What a rule matches, each in turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `ip saddr|daddr [!=] NET`.
    Ip {
        field: Field,
        net: Ipv4Net,
        not: bool,
    },
    /// `meta mark & MASK == VALUE`.
    Mark { mask: u32, value: u32 },
    /// `oifname "NAME"`.
    OifName(String),
    /// `meta l4proto PROTO`.
    L4Proto(u8),
}

/// What a rule does once it matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Return,
    /// `accept`.
    Accept,
    /// `masquerade fully-random`.
    MasqueradeFullyRandom,
}

/// A rule: its matches, its action and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
    pub comment: std::borrow::Cow<'static, str>,
}

fn expr(name: &str, data: &[Vec<u8>]) -> Vec<u8> {
    nested(
        NFTA_LIST_ELEM,
        &[string(NFTA_EXPR_NAME, name), nested(NFTA_EXPR_DATA, data)],
    )
}

fn cmp(not: bool, value: &[u8]) -> Vec<u8> {
    expr(
        "cmp",
        &[
            be32(1, REG_1),                             // NFTA_CMP_SREG
            be32(2, u32::from(not)),                    // NFTA_CMP_OP: NFT_CMP_EQ 0, NFT_CMP_NEQ 1
            nested(3, &[attr(NFTA_DATA_VALUE, value)]), // NFTA_CMP_DATA
        ],
    )
}

fn bitwise(len: u32, mask: &[u8]) -> Vec<u8> {
    expr(
        "bitwise",
        &[
            be32(1, REG_1),                                            // NFTA_BITWISE_SREG
            be32(2, REG_1),                                            // NFTA_BITWISE_DREG
            be32(3, len),                                              // NFTA_BITWISE_LEN
            nested(4, &[attr(NFTA_DATA_VALUE, mask)]),                 // NFTA_BITWISE_MASK
            nested(5, &[attr(NFTA_DATA_VALUE, &vec![0; mask.len()])]), // NFTA_BITWISE_XOR
        ],
    )
}

fn meta(key: u32) -> Vec<u8> {
    // NFTA_META_DREG, NFTA_META_KEY.
    expr("meta", &[be32(1, REG_1), be32(2, key)])
}

/// The expressions of `m`, as nft compiles it.
fn match_exprs(m: &Match) -> Vec<Vec<u8>> {
    match m {
        Match::Ip { field, net, not } => {
            let offset = match field {
                Field::Saddr => 12,
                Field::Daddr => 16,
            };
            // NFTA_PAYLOAD_DREG, _BASE (network header), _OFFSET, _LEN.
            let load = expr(
                "payload",
                &[be32(1, REG_1), be32(2, 1), be32(3, offset), be32(4, 4)],
            );
            let mask = Ipv4Net::containing(Ipv4Addr::BROADCAST, net.prefix());
            let mut v = vec![load];
            if net.prefix() < 32 {
                v.push(bitwise(4, &mask.addr().octets()));
            }
            v.push(cmp(*not, &net.addr().octets()));
            v
        }
        Match::Mark { mask, value } => vec![
            meta(3), // NFT_META_MARK
            bitwise(4, &mask.to_ne_bytes()),
            cmp(false, &value.to_ne_bytes()),
        ],
        Match::OifName(name) => {
            let mut padded = [0u8; 16];
            let n = name.len().min(15);
            padded[..n].copy_from_slice(&name.as_bytes()[..n]);
            vec![meta(7), cmp(false, &padded)] // NFT_META_OIFNAME
        }
        Match::L4Proto(p) => vec![meta(16), cmp(false, &[*p])], // NFT_META_L4PROTO
    }
}

/// `immediate` of a verdict into the verdict register.
fn verdict(code: u32) -> Vec<u8> {
    expr(
        "immediate",
        &[
            be32(1, REG_VERDICT), // NFTA_IMMEDIATE_DREG
            nested(
                2, // NFTA_IMMEDIATE_DATA
                &[nested(NFTA_DATA_VERDICT, &[be32(NFTA_VERDICT_CODE, code)])],
            ),
        ],
    )
}

fn action_expr(a: Action) -> Vec<u8> {
    match a {
        Action::Return => verdict(NFT_RETURN as u32),
        Action::Accept => verdict(NF_ACCEPT),
        // NFTA_MASQ_FLAGS.
        Action::MasqueradeFullyRandom => expr("masq", &[be32(1, NF_NAT_RANGE_PROTO_RANDOM_FULLY)]),
    }
}

/// The body of a NEWRULE message appending `rule` to `table`'s `chain`.
fn rule_attrs(table: &str, chain: &str, rule: &Rule) -> Vec<u8> {
    let exprs: Vec<Vec<u8>> = rule
        .matches
        .iter()
        .flat_map(match_exprs)
        .chain([action_expr(rule.action)])
        .collect();
    let mut comment = rule.comment.as_bytes().to_vec();
    comment.push(0);
    let mut udata = vec![UDATA_RULE_COMMENT, comment.len() as u8];
    udata.extend(comment);
    [
        string(NFTA_RULE_TABLE, table),
        string(NFTA_RULE_CHAIN, chain),
        nested(NFTA_RULE_EXPRESSIONS, &exprs),
        attr(NFTA_RULE_USERDATA, &udata),
    ]
    .concat()
}

/// An nfnetlink message's headers.
struct Message {
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
}

impl Message {
    /// Appends the message, its headers then `attrs`, to `out`.
    fn write(&self, attrs: &[u8], out: &mut Vec<u8>) {
        let len = 16 + 4 + attrs.len();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&self.kind.to_ne_bytes());
        out.extend_from_slice(&(NLM_F_REQUEST | self.flags).to_ne_bytes());
        out.extend_from_slice(&self.seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, resource id (big endian).
        out.push(self.family);
        out.push(0);
        out.extend_from_slice(&self.res_id.to_be_bytes());
        out.extend_from_slice(attrs);
    }
}

/// A netlink socket to nf_tables, connected to the kernel.
fn kernel_socket() -> Result<Socket, NftError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
    socket.bind_auto().map_err(NftError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(NftError::Socket)?;
    Ok(socket)
}

/// A batch of nf_tables messages, sent as one transaction.
struct Batch {
    messages: Vec<u8>,
    seq: u32,
}

impl Batch {
    fn new() -> Batch {
        let mut b = Batch {
            messages: Vec::new(),
            seq: 0,
        };
        b.push(NFNL_MSG_BATCH_BEGIN, 0, 0, NFNL_SUBSYS_NFTABLES, &[]);
        b
    }

    fn push(&mut self, kind: u16, flags: u16, family: u8, res_id: u16, attrs: &[u8]) {
        self.seq += 1;
        let message = Message {
            kind,
            flags,
            seq: self.seq,
            family,
            res_id,
        };
        message.write(attrs, &mut self.messages);
    }

    fn nft(&mut self, msg: u16, flags: u16, attrs: &[u8]) {
        self.push(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_ACK | flags,
            AF_INET,
            0,
            attrs,
        );
    }

    /// Sends the batch; the first error the kernel answers, if any.
    fn commit(mut self, what: &'static str) -> Result<(), NftError> {
        let last = self.seq;
        self.push(NFNL_MSG_BATCH_END, 0, 0, NFNL_SUBSYS_NFTABLES, &[]);
        let socket = kernel_socket()?;
        socket.send(&self.messages, 0).map_err(NftError::Socket)?;
        // One ACK per message that asked for one (those between begin and end), or an error.
        let mut acked = 1;
        while acked < last {
            let (data, _) = socket.recv_from_full().map_err(NftError::Socket)?;
            let mut rest = &data[..];
            while rest.len() >= 20 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                if kind == NLMSG_ERROR {
                    let code = i32::from_ne_bytes(rest[16..20].try_into().expect("4 bytes"));
                    if code != 0 {
                        return Err(NftError::Kernel {
                            what,
                            source: std::io::Error::from_raw_os_error(-code),
                        });
                    }
                    acked += 1;
                }
                rest = rest
                    .get(len.max(20).next_multiple_of(4)..)
                    .unwrap_or_default();
            }
        }
        Ok(())
    }
}

/// Creates (or re-creates, replacing what is there) table `ip TABLE` with one base chain
/// `CHAIN` of type nat on postrouting at srcnat's priority, policy accept, holding `rules`:
/// one transaction, as `nft -f` applies `table ip T; delete table ip T; table ip T { ... }`.
pub fn replace_nat_table(table: &str, chain: &str, rules: &[Rule]) -> Result<(), NftError> {
    let mut b = Batch::new();
    let name = string(NFTA_TABLE_NAME, table);
    b.nft(NFT_MSG_NEWTABLE, NLM_F_CREATE, &name);
    b.nft(NFT_MSG_DELTABLE, 0, &name);
    b.nft(NFT_MSG_NEWTABLE, NLM_F_CREATE, &name);
    let hook = nested(
        NFTA_CHAIN_HOOK,
        &[
            be32(NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING),
            be32(NFTA_HOOK_PRIORITY, PRIORITY_SRCNAT as u32),
        ],
    );
    b.nft(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        &[
            string(NFTA_CHAIN_TABLE, table),
            string(NFTA_CHAIN_NAME, chain),
            hook,
            be32(NFTA_CHAIN_POLICY, NF_ACCEPT),
            string(NFTA_CHAIN_TYPE, "nat"),
        ]
        .concat(),
    );
    for rule in rules {
        b.nft(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            &rule_attrs(table, chain, rule),
        );
    }
    b.commit("the masquerade rules")
}

/// A rule of a chain as the kernel lists it: its handle and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub handle: u64,
    pub comment: Option<String>,
}

/// The rules of `ip TABLE`'s `CHAIN`, in order; none when the table or chain is not there
/// (the kernel's dump filters by name and finds nothing).
pub fn list_rules(table: &str, chain: &str) -> Result<Vec<Listed>, NftError> {
    let mut request = Vec::new();
    let dump = Message {
        kind: (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
        flags: NLM_F_DUMP,
        seq: 1,
        family: AF_INET,
        res_id: 0,
    };
    let filter = [
        string(NFTA_RULE_TABLE, table),
        string(NFTA_RULE_CHAIN, chain),
    ];
    dump.write(&filter.concat(), &mut request);
    let socket = kernel_socket()?;
    socket.send(&request, 0).map_err(NftError::Socket)?;
    let mut rules = Vec::new();
    // The rule set changed during the dump: the listing may miss or repeat rules.
    let mut interrupted = false;
    loop {
        let (data, _) = socket.recv_from_full().map_err(NftError::Socket)?;
        let mut rest = &data[..];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            let flags = u16::from_ne_bytes([rest[6], rest[7]]);
            interrupted |= flags & NLM_F_DUMP_INTR != 0;
            let message = rest.get(..len).ok_or(NftError::Malformed)?;
            match kind {
                NLMSG_DONE if interrupted => return Err(NftError::Interrupted),
                NLMSG_DONE => return Ok(rules),
                NLMSG_ERROR => {
                    let code = message.get(16..20).ok_or(NftError::Malformed)?;
                    let code = i32::from_ne_bytes(code.try_into().expect("4 bytes"));
                    if code == 0 {
                        rest = rest
                            .get(len.max(16).next_multiple_of(4)..)
                            .unwrap_or_default();
                        continue;
                    }
                    return Err(NftError::Kernel {
                        what: "the rule listing",
                        source: std::io::Error::from_raw_os_error(-code),
                    });
                }
                _ => {
                    let (rule, of) = parse_listed(message.get(20..).ok_or(NftError::Malformed)?)?;
                    // Older kernels ignore the dump's filter and list every table's rules.
                    if of == (Some(table), Some(chain)) {
                        rules.push(rule);
                    }
                }
            }
            rest = rest
                .get(len.max(16).next_multiple_of(4)..)
                .unwrap_or_default();
        }
    }
}

/// A NUL-ended name attribute as text.
fn name(payload: &[u8]) -> Option<&str> {
    let text = payload.split(|b| *b == 0).next().unwrap_or_default();
    std::str::from_utf8(text).ok()
}

/// The table and chain a listed rule names, if it names them.
type RuleOf<'a> = (Option<&'a str>, Option<&'a str>);

/// A listed rule's handle and comment, from its attributes, and its table and chain.
fn parse_listed(mut attrs: &[u8]) -> Result<(Listed, RuleOf<'_>), NftError> {
    let mut handle = None;
    let mut comment = None;
    let (mut table, mut chain) = (None, None);

    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & !0xc000;
        let payload = attrs.get(4..len).ok_or(NftError::Malformed)?;
        match kind {
            NFTA_RULE_HANDLE => {
                let bytes = payload.try_into().map_err(|_| NftError::Malformed)?;
                handle = Some(u64::from_be_bytes(bytes));
            }
            NFTA_RULE_USERDATA => comment = udata_comment(payload),
            NFTA_RULE_TABLE => table = name(payload),
            NFTA_RULE_CHAIN => chain = name(payload),
            _ => {}
        }
        attrs = attrs.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    let listed = Listed {
        handle: handle.ok_or(NftError::Malformed)?,
        comment,
    };
    Ok((listed, (table, chain)))
}

/// The comment in a rule's user data (type-length-value items; the comment is NUL-ended).
fn udata_comment(mut udata: &[u8]) -> Option<String> {
    while let [kind, len, rest @ ..] = udata {
        let value = rest.get(..usize::from(*len))?;
        if *kind == UDATA_RULE_COMMENT {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        udata = &rest[usize::from(*len)..];
    }
    None
}

/// Deletes the rules `delete` (by handle) from `ip TABLE`'s `CHAIN` and appends `append`, as
/// one transaction. A table or chain that is not there fails it ([`NftError::is_not_found`]).
pub fn replace_rules(
    table: &str,
    chain: &str,
    delete: &[u64],
    append: &[Rule],
) -> Result<(), NftError> {
    let mut b = Batch::new();
    for handle in delete {
        let attrs = [
            string(NFTA_RULE_TABLE, table),
            string(NFTA_RULE_CHAIN, chain),
            attr(NFTA_RULE_HANDLE, &handle.to_be_bytes()),
        ]
        .concat();
        b.nft(NFT_MSG_DELRULE, 0, &attrs);
    }
    for rule in append {
        b.nft(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            &rule_attrs(table, chain, rule),
        );
    }
    b.commit("the rule change")
}

/// Deletes table `ip TABLE` (nothing if it is not there), as `table ip T; delete table ip T`.
pub fn remove_table(table: &str) -> Result<(), NftError> {
    let mut b = Batch::new();
    let name = string(NFTA_TABLE_NAME, table);
    b.nft(NFT_MSG_NEWTABLE, NLM_F_CREATE, &name);
    b.nft(NFT_MSG_DELTABLE, 0, &name);
    b.commit("the table removal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_prefix_match_is_load_mask_compare() {
        let m = Match::Ip {
            field: Field::Saddr,
            net: "10.244.0.0/16".parse().unwrap(),
            not: true,
        };
        let e = match_exprs(&m);
        assert_eq!(e.len(), 3);
        let names: Vec<bool> = ["payload", "bitwise", "cmp"]
            .iter()
            .zip(&e)
            .map(|(n, x)| x.windows(n.len()).any(|w| w == n.as_bytes()))
            .collect();
        assert_eq!(names, [true, true, true]);
        // The mask is 255.255.0.0; a /32 needs none.
        assert!(e[1].windows(4).any(|w| w == [255, 255, 0, 0]));
        let host = Match::Ip {
            field: Field::Daddr,
            net: "10.96.0.10/32".parse().unwrap(),
            not: false,
        };
        assert_eq!(match_exprs(&host).len(), 2);
    }

    #[test]
    fn test_listed_rule_gives_handle_and_comment() {
        let rule = Rule {
            matches: vec![],
            action: Action::Accept,
            comment: "podwire forward".into(),
        };
        let mut attrs = rule_attrs("filter", "FORWARD", &rule);
        attrs.extend(attr(NFTA_RULE_HANDLE, &7u64.to_be_bytes()));
        let (listed, of) = parse_listed(&attrs).unwrap();
        assert_eq!(of, (Some("filter"), Some("FORWARD")));
        assert_eq!(listed.handle, 7);
        assert_eq!(listed.comment.as_deref(), Some("podwire forward"));
        // No handle, or an attribute that lies about its length: malformed, no panic.
        assert!(parse_listed(&rule_attrs("filter", "FORWARD", &rule)).is_err());
        let mut lying = attr(NFTA_RULE_HANDLE, &7u64.to_be_bytes());
        lying[0] = 200;
        assert!(parse_listed(&lying).is_err());
        assert_eq!(udata_comment(&[UDATA_RULE_COMMENT, 9, b'x']), None);
    }

    #[test]
    fn test_batch_is_framed_by_begin_and_end() {
        let mut b = Batch::new();
        b.nft(
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            &string(NFTA_TABLE_NAME, "t"),
        );
        let first = u16::from_ne_bytes([b.messages[4], b.messages[5]]);
        assert_eq!(first, NFNL_MSG_BATCH_BEGIN);
        let second_at = 20;
        let kind = u16::from_ne_bytes([b.messages[second_at + 4], b.messages[second_at + 5]]);
        assert_eq!(kind, NFNL_SUBSYS_NFTABLES << 8);
    }
}
