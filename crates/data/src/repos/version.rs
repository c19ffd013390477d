//! PEP 440 versions, to order the releases of a PyPI project: a thin wrapper around the
//! [`pep440_rs`] crate (the parser of uv), which implements PEP 440 in full: the
//! spellings PEP 440 normalises (`alpha`, `beta`, `c`, `pre`, `preview`, `-1` for a post
//! release, `r`/`rev`, a leading `v`, `-` and `_` as separators, any case) and its order:
//! `1.0.dev1 < 1.0a1.dev1 < 1.0a1 < 1.0a1.post1 < 1.0b1 < 1.0rc1 < 1.0 < 1.0.post1.dev1
//! < 1.0.post1`, and `1.0 == 1.0.0`. The local part (`+ubuntu1`) is dropped when parsing,
//! so it plays no part in the order or equality (PyPI does not host local versions).

use std::str::FromStr;

/// A parsed version (its local part dropped).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pep440_rs::Version);

impl Version {
    /// Parse a version string; `None` when it is not PEP 440 (legacy versions).
    pub fn parse(s: &str) -> Option<Version> {
        pep440_rs::Version::from_str(s)
            .ok()
            .map(|v| Version(v.without_local()))
    }

    /// A pre-release or a development release.
    pub fn is_prerelease(&self) -> bool {
        self.0.any_prerelease()
    }

    pub fn epoch(&self) -> u64 {
        self.0.epoch()
    }

    /// Release numbers with trailing zeros trimmed (so `1.0` and `1.0.0` give `[1]`).
    pub fn release(&self) -> &[u64] {
        let r = self.0.release();
        let n = r.iter().rposition(|&x| x != 0).map_or(1, |i| i + 1);
        &r[..n.min(r.len())]
    }

    /// `(phase, n)`: phase 0 = a, 1 = b, 2 = rc.
    pub fn pre(&self) -> Option<(u8, u64)> {
        use pep440_rs::PrereleaseKind as K;
        self.0.pre().map(|p| {
            let phase = match p.kind {
                K::Alpha => 0,
                K::Beta => 1,
                K::Rc => 2,
            };
            (phase, p.number)
        })
    }

    pub fn post(&self) -> Option<u64> {
        self.0.post()
    }

    pub fn dev(&self) -> Option<u64> {
        self.0.dev()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap_or_else(|| panic!("{s} does not parse"))
    }

    #[test]
    fn orders_like_pep440() {
        let order = [
            "0.9",
            "1.0.dev0",
            "1.0.dev1",
            "1.0a1.dev1",
            "1.0a1",
            "1.0a1.post1",
            "1.0alpha2",
            "1.0b1",
            "1.0rc1",
            "1.0c2",
            "1.0",
            "1.0.post1.dev1",
            "1.0.post1",
            "1.0-2",
            "1.0.1",
            "1.2",
            "1.10",
            "2.0.0",
            "1!0.1",
        ];
        for w in order.windows(2) {
            assert!(v(w[0]) < v(w[1]), "{} < {}", w[0], w[1]);
        }
        assert_eq!(v("1.0"), v("1.0.0"));
        assert_eq!(v("v2.3.0"), v("2.3"));
        assert_eq!(v("1.0RC1"), v("1.0rc1"));
        assert_eq!(v("2.0+local.1"), v("2.0"));
        assert!(v("1.0rc1").is_prerelease() && v("1.0.dev0").is_prerelease());
        assert!(!v("1.0.post1").is_prerelease());
        assert_eq!(v("1!0.1").epoch(), 1);
        assert_eq!(v("1.0c2").pre(), Some((2, 2)));
        assert_eq!(v("1.0alpha").pre(), Some((0, 0)));
        assert_eq!((v("1.0-2").post(), v("1.0-2").dev()), (Some(2), None));
        assert_eq!(v("1.0.dev").dev(), Some(0));
        assert_eq!(v("0.0").release(), [0]);
        assert!(Version::parse("1.0-foo").is_none());
        // Malformed local parts are rejected, not ignored.
        assert!(Version::parse("1.0+").is_none());
        assert!(Version::parse("latest").is_none());
        assert!(Version::parse("").is_none());
    }

    #[test]
    fn sorts_real_release_lists() {
        let mut vs = [
            "2.10.0", "2.9.2", "2.0.1", "2.3.0", "0.14.2", "3.0.0b1", "2.31.0",
        ]
        .map(v)
        .to_vec();
        vs.sort();
        let back: Vec<String> = vs
            .iter()
            .map(|x| {
                x.release()
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect();
        assert_eq!(
            back,
            ["0.14.2", "2.0.1", "2.3", "2.9.2", "2.10", "2.31", "3"]
        );
    }
}
