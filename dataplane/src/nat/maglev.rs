//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as IPVS's `mh` scheduler and
//! Cilium use it: a lookup table of prime size M in which every backend owns about M/N slots,
//! filled from per-backend permutations so that adding or removing one backend moves only
//! about 1/N of the flows. Every node builds the same table from the same backends (the hashes
//! are fixed, not seeded per process), so a flow picks the same backend wherever it starts.

use core::net::SocketAddrV4;

/// The table sizes Maglev may use: primes, as IPVS `mh` offers them.
pub const PRIMES: [usize; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];

/// The default (and Cilium's) largest table: under 1 % reshuffle for up to ~160 backends.
pub const DEFAULT_MAX_SIZE: usize = 16381;

/// A filled lookup table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Box<[u16]>,
}

/// A fixed 64-bit mix (splitmix64's finaliser).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn backend_key(b: &SocketAddrV4) -> u64 {
    u64::from(b.ip().to_bits()) << 16 | u64::from(b.port())
}

/// The table size for `n` backends: the smallest prime above 100·n (Maglev's rule of thumb
/// for small disruption), at most `max` (which must itself be one of `PRIMES`, or is rounded
/// down to one).
pub fn table_size(n: usize, max: usize) -> usize {
    let cap = PRIMES
        .iter()
        .copied()
        .filter(|&p| p <= max)
        .max()
        .unwrap_or(PRIMES[0]);
    PRIMES
        .iter()
        .copied()
        .find(|&p| p >= n.saturating_mul(100))
        .unwrap_or(cap)
        .min(cap)
}

impl Maglev {
    /// Builds the table of size `m` (a prime) for `backends` (at most 65535, not empty).
    pub fn new(backends: &[SocketAddrV4], m: usize) -> Maglev {
        assert!(!backends.is_empty() && backends.len() <= usize::from(u16::MAX));
        let n = backends.len();
        let perm: Vec<(usize, usize)> = backends
            .iter()
            .map(|b| {
                let k = backend_key(b);
                let offset = (mix64(k ^ 0x6d61_676c_6576_3031) % m as u64) as usize;
                let skip = (mix64(k ^ 0x736b_6970_7365_6564) % (m as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; n];
        let mut table = vec![u16::MAX; m];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                let (offset, skip) = perm[i];
                let mut c = (offset + next[i] * skip) % m;
                while table[c] != u16::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c] = i as u16;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev {
            table: table.into_boxed_slice(),
        }
    }

    /// The backend index for a flow hash.
    #[inline]
    pub fn pick(&self, hash: u64) -> usize {
        usize::from(self.table[(hash % self.table.len() as u64) as usize])
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    fn backends(n: u32) -> Vec<SocketAddrV4> {
        (0..n)
            .map(|i| SocketAddrV4::new(Ipv4Addr::from_bits(0x0af4_0002 + (i << 8)), 8080))
            .collect()
    }

    #[test]
    fn test_every_backend_gets_its_share_of_slots() {
        for n in [1u32, 2, 3, 7, 50] {
            let m = Maglev::new(&backends(n), 16381);
            let mut count = vec![0usize; n as usize];
            for s in m.table.iter() {
                count[usize::from(*s)] += 1;
            }
            let ideal = 16381 / n as usize;
            for c in count {
                assert!(c.abs_diff(ideal) <= ideal / 50 + 1, "n={n}: {c} vs {ideal}");
            }
        }
    }

    #[test]
    fn test_removing_one_backend_moves_few_other_flows() {
        let all = backends(10);
        let before = Maglev::new(&all, 16381);
        let after = Maglev::new(&all[..9], 16381);
        let (mut moved, mut kept_total) = (0, 0);
        for h in 0..100_000u64 {
            let h = mix64(h);
            let b = before.pick(h);
            if b == 9 {
                continue;
            }
            kept_total += 1;
            if after.pick(h) != b {
                moved += 1;
            }
        }
        // Flows of surviving backends mostly stay (Maglev's paper: a few percent move).
        assert!(moved * 100 < kept_total * 3, "{moved}/{kept_total}");
    }

    const PINNED_FINGERPRINT: u64 = 63315;

    #[test]
    fn test_same_backends_same_table_regardless_of_process() {
        let a = Maglev::new(&backends(3), 251);
        let b = Maglev::new(&backends(3), 251);
        assert_eq!(a, b);
        // Pinned: a change of hash would put nodes of one cluster on different tables.
        let fingerprint: u64 = a
            .table
            .iter()
            .enumerate()
            .map(|(i, &b)| (i as u64 + 1) * (u64::from(b) + 1))
            .sum();
        assert_eq!(fingerprint, PINNED_FINGERPRINT);
    }

    #[test]
    fn test_table_size_follows_backend_count() {
        assert_eq!(table_size(1, 16381), 251);
        assert_eq!(table_size(3, 16381), 509);
        assert_eq!(table_size(100, 16381), 16381);
        assert_eq!(table_size(1000, 16381), 16381);
        assert_eq!(table_size(1000, 65521), 65521);
    }
}
